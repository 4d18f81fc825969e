"""`stella` command line: each command parses its options and calls one function elsewhere."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from stella_cli.console import console, is_main, print_rows, rank_prefix  # rich only: no torch at start-up
from stella_cli.errors import Interrupted, StellaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="STELLA: continual audio-video pre-training (ICML 2024), its baselines and evaluation.",
)
DEFAULT_SYNTHETIC_OUT = Path("data/synthetic")  # where recipes/synthetic.yaml looks for it


@app.callback()
def _root() -> None:
    """STELLA: continual audio-video pre-training (ICML 2024), its baselines and evaluation."""


# OpenMP waiting (docs/benchmarks.md "Threads on a busy CPU"). torch's OpenMP (libgomp) lets a thread that waits for the others
# spin for 300000 iterations (milliseconds) before it sleeps: on a busy CPU (a laptop, CI, a shared server) the
# spinning threads take the cores from the ones doing the work. PASSIVE sleeps at once and pays a wake-up per
# parallel region when idle. Demo steps on 2 cores (benchmarks/bench_threads.py): with other jobs running, 300000
# spins 2.00 s, 1000 spins 0.21 s, PASSIVE 0.18 s; quiet, 300000 spins 0.104 s, 1000 spins 0.105 s, PASSIVE 0.143 s.
# Waiting never changes a number: results stay bit-identical for the same seed and thread count.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}
OPENMP_USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_openmp_defaults(env: MutableMapping[str, str] | None = None) -> None:
    """Set OPENMP_DEFAULTS unless the user chose a wait policy; must run before torch loads (libgomp reads its
    environment once).  Thread count: torch's default (one per core) or the user's OMP_NUM_THREADS."""
    env = os.environ if env is None else env
    if not any(k in env for k in OPENMP_USER_KEYS):
        env.update(OPENMP_DEFAULTS)


def main() -> None:
    """Run the CLI; an expected failure is one line and its exit code (errors.py), anything else a traceback."""
    set_openmp_defaults()  # before any command imports torch
    try:
        app()
    except Interrupted as stop:  # a saved stop: what was kept and how to continue, exit 130
        console.print(f"{escape(rank_prefix())}[yellow]{escape(str(stop))}", soft_wrap=True)
        raise SystemExit(stop.exit_code)
    except StellaError as err:  # bad input (2) or divergence (3): one line, never wrapped, no traceback
        console.print(f"{escape(rank_prefix())}[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        raise SystemExit(err.exit_code)


@app.command()
def prep(
    dataset: str = typer.Argument("synthetic", help="synthetic | vggsound | audioset | audioset20k | ave | avs | "
                                                    "msrvtt"),
    out: Optional[Path] = typer.Option(None, help="Output data folder (default: data/synthetic for synthetic)."),
    list_file: Optional[str] = typer.Option(
        None, "--list", help="Clip list per split: SPLIT=FILE, comma-joined (train and test required, retrieval "
                             "optional); FILE a CAV-MAE json or the authors' STELLA csv; or a folder holding them "
                             "under their usual names. Without --list: ROOT/{train,test}/CLASS/*.mp4. ave: the "
                             "AVE_Dataset folder or train=FILE,test=FILE[,annotations=FILE]; avs: s4_meta_data.csv; "
                             "msrvtt: train=FILE,test=FILE or a folder of the lists."),
    root: Optional[Path] = typer.Option(None, help="Folder holding the clips (mp4/mkv/webm at any depth, linked "
                                                   "folders followed; avs: also AVSBench's s4_data with "
                                                   "visual_frames + audio_wav)."),
    categories: Optional[Path] = typer.Option(
        None, help="Class -> category table (VGGSound stat.csv, AudioSet class lists)."),
    labels: Optional[Path] = typer.Option(None, help="CAV-MAE label csv (index,mid,display_name; the header line "
                                                     "is optional)."),
    masks: Optional[Path] = typer.Option(None, help="avs only: AVSBench's gt_masks folder (frame 1's png of a "
                                                    "train video, frames 1-5 of a test video; default "
                                                    "ROOT/gt_masks)."),
    allow_leaks: bool = typer.Option(False, "--allow-leaks", help="Keep clips listed in both train and test "
                                                                  "(refused by default; counted in prep_report.json)."),
    subset: str = typer.Option("tasks", help="vggsound | audioset: tasks (the continual task split) | unused "
                                             "(VGGSound clips the tasks leave out) | all (every clip: VGGSound "
                                             "'Origin', AudioSet-20K)."),
    vggsound: Optional[Path] = typer.Option(None, help="audioset20k only: the prepared VGGSound task split whose "
                                                       "unused clips join AudioSet-20K."),
    workers: int = typer.Option(2, help="Parallel worker processes."),
    frames_format: str = typer.Option("raw", help="Frame cache: raw (uint8 memmap, fastest) | jpeg (~5x smaller)."),
    seed: int = typer.Option(0, help="Synthetic only: generator seed."),
    fmt: str = typer.Option("cache", "--format", help="Synthetic only: cache (direct) | mp4 (encode real mp4 "
                                                       "files and prepare them through the decoding path)."),
    heldout: bool = typer.Option(True, help="Synthetic only: also write the held-out domain (OUT/heldout), the "
                                            "transfer target of `stella eval --task msrvtt`."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    check: Optional[Path] = typer.Option(None, help="Verify the prepared folder CHECK (file sizes, manifests against "
                                                    "the cache, meta.json against the manifests) without changing "
                                                    "it; every other option is ignored."),
) -> None:
    """Build a dataset: manifests + feature cache (synthetic benchmark, VGGSound, AudioSet, AVE, AVS, MSR-VTT)."""
    import shutil

    if check is not None:
        check_prepared_folder(check)
        return
    if dataset == "synthetic":
        out = out or DEFAULT_SYNTHETIC_OUT
    elif dataset not in ("vggsound", "audioset", "audioset20k", "ave", "avs", "msrvtt"):
        raise StellaError(f"stella prep: unknown dataset {dataset!r}; choose synthetic, vggsound, audioset, "
                          "audioset20k, ave, avs or msrvtt")
    elif out is None:
        raise StellaError(f"stella prep {dataset}: --out DATA_DIR is required")
    if workers < 0:
        raise StellaError(f"stella prep: --workers must be >= 0 (0 or 1: no worker processes), got {workers}")
    if subset != "tasks" and dataset not in ("vggsound", "audioset"):
        raise StellaError(f"stella prep {dataset}: --subset is for vggsound and audioset only")
    if (vggsound is not None) != (dataset == "audioset20k"):
        raise StellaError("stella prep audioset20k: --vggsound DATA_DIR (the prepared VGGSound task split) is "
                          "required" if dataset == "audioset20k" else "--vggsound is for audioset20k only")
    from stella_cli.files import LOCK_NAME, holding

    fresh = not out.exists() or not {p.name for p in out.iterdir()} - {LOCK_NAME}
    with holding(out, advice="wait for it to end or stop it (a prep continues where it stopped), or choose "
                             "another --out"):  # one prep at a time into one folder
        try:
            summary = prepare_dataset(dataset, out, list_file=list_file, root=root, categories=categories,
                                      labels=labels, masks=masks, workers=workers, frames_format=frames_format,
                                      seed=seed, fmt=fmt, heldout=heldout, quiet=quiet, subset=subset,
                                      vggsound=vggsound, allow_leaks=allow_leaks)
        except KeyboardInterrupt:  # the workers are stopped already (leaving their pool terminates them)
            raise Interrupted(f"stella prep interrupted; the clips prepared so far are kept in {out}: run the same "
                              f"command again to continue") from None
        if not sum(summary["splits"].get("train", {}).values()):  # nothing usable: fail, and leave nothing behind
            skipped = summary.get("skipped_clips", {}).get("train", [])
            example = f", e.g. {skipped[0]['clip_id']}: {skipped[0]['reason']}" if skipped else ""
            if fresh:
                shutil.rmtree(out, ignore_errors=True)
            raise StellaError(f"stella prep {dataset}: no training clip could be prepared ({len(skipped)} skipped"
                              f"{example}); check --root and --list" + (f" ({out} removed)" if fresh else ""))
    print_prep_summary(summary)


def check_prepared_folder(root: Path) -> None:
    """`stella prep --check DIR` (and DIR/heldout, which `stella prep synthetic` writes beside the benchmark)."""
    from stella_cli.cache import check_folder, prep_command_of, read_meta

    if not (root / "meta.json").is_file():
        raise StellaError(f"{root}: not a prepared folder (no meta.json); give the --out of a `stella prep`")
    folders = [root] + [root / "heldout"] * (root / "heldout" / "meta.json").is_file()
    found = []
    for folder in folders:
        table, problems = check_folder(folder)
        if table:
            meta = read_meta(folder)
            print_rows(f"{folder}: {meta['dataset']}, {len(meta['tasks'])} tasks, {len(meta['classes'])} classes, "
                       f"{meta['spec'].get('frames_format', 'raw')} frames",
                       [["split", "clips", "cache rows", "done", "failed", "pending", "size"], *table])
        for problem in problems:
            console.print(f"[red]problem:[/red] {escape(problem)}", soft_wrap=True)
        found += [(folder, problems)] if problems else []
    if found:
        folder, problems = found[0]
        total = sum(len(p) for _, p in found)
        raise StellaError(f"{folder}: {total} problem{'s' * (total > 1)} (above); `{prep_command_of(folder)}` "
                          "rebuilds what is missing or damaged and keeps the rest")
    console.print(f"{', '.join(map(str, folders))}: every cache file whole, every manifest row cached and done, "
                  "meta.json agrees with the manifests", soft_wrap=True)


def prepare_dataset(dataset: str, out: Path, *, list_file: Optional[str], root: Optional[Path],
                    categories: Optional[Path], labels: Optional[Path], masks: Optional[Path], workers: int,
                    frames_format: str, seed: int, fmt: str, heldout: bool, quiet: bool, subset: str = "tasks",
                    vggsound: Optional[Path] = None, allow_leaks: bool = False) -> dict:
    """`stella prep DATASET`: the one preparing function of each dataset (its summary dict)."""
    from stella_cli.errors import StellaError

    if dataset == "synthetic":
        from stella_cli.synth import prepare_synthetic

        summary = prepare_synthetic(out, seed=seed, fmt=fmt, workers=workers, frames_format=frames_format,
                                    progress=not quiet)
        if not heldout:
            return summary
        from stella_cli.synth import heldout_dir, prepare_heldout  # `stella eval --task msrvtt`'s domain

        print_prep_summary(summary)
        return prepare_heldout(heldout_dir(out), seed=seed, workers=workers, frames_format=frames_format,
                               progress=not quiet)
    if dataset in ("vggsound", "audioset"):
        from stella_cli.prep import prepare_real

        return prepare_real(dataset, out=out, list_file=list_file, root=root, categories=categories, labels=labels,
                            workers=workers, frames_format=frames_format, progress=not quiet, subset=subset,
                            allow_leaks=allow_leaks)
    if dataset == "audioset20k":  # the init chain's step 2: AudioSet-20K + the VGGSound clips the tasks leave out
        from stella_cli.prep_init import prepare_audioset20k

        return prepare_audioset20k(out, list_file=list_file, root=root, labels=labels, vggsound=vggsound,
                                   workers=workers, frames_format=frames_format, progress=not quiet,
                                   allow_leaks=allow_leaks)
    if root is None:
        raise StellaError(f"stella prep {dataset}: --root VIDEOS is required")
    if dataset == "ave":
        from stella_cli.prep_downstream import prepare_ave

        return prepare_ave(out, root=root, annotations=list_file, workers=workers, frames_format=frames_format,
                           progress=not quiet, allow_leaks=allow_leaks)
    if dataset == "avs":
        from stella_cli.prep_downstream import prepare_avs

        if list_file is None:
            raise StellaError("stella prep avs: --list s4_meta_data.csv is required")
        return prepare_avs(out, root=root, meta_csv=Path(list_file), masks=masks, workers=workers,
                           frames_format=frames_format, progress=not quiet, allow_leaks=allow_leaks)
    from stella_cli.prep_downstream import prepare_msrvtt

    if list_file is None:
        raise StellaError("stella prep msrvtt: --list (train=FILE,test=FILE or a folder of the lists) is required")
    return prepare_msrvtt(out, root=root, lists=list_file, workers=workers, frames_format=frames_format,
                          progress=not quiet, allow_leaks=allow_leaks)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/synthetic.yaml, or the name of a shipped "
                                            "recipe, e.g. synthetic_stella."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set optim.lr=5e-5 "
                                                          "(repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in output.dir from its latest checkpoint."),
    print_config: bool = typer.Option(False, help="Print the resolved recipe and exit."),
    quiet: bool = typer.Option(False, help="No progress bars (the per-task retrieval lines and the final table "
                                           "are still printed)."),
    stop_after: Optional[int] = typer.Option(None, help="Stop with a checkpoint after this many optimiser steps "
                                                        "in total (e.g. a time-limited job); continue with --resume."),
) -> None:
    """Continual pre-training over the recipe's task sequence, with retrieval after every task."""
    from stella_cli.config import load_recipe, recipe_to_yaml
    from stella_cli.factory import check_initial_checkpoint, check_method

    resolved = load_recipe(recipe, overrides)
    check_method(resolved, str(recipe))
    if not resume and not print_config:  # a paper recipe without its pre-trained start, named by its file
        check_initial_checkpoint(resolved, str(recipe))
    if stop_after is not None and stop_after < 1:
        raise StellaError(f"--stop-after {stop_after}: must be at least 1 (optimiser steps in total)")
    if print_config:
        console.print(recipe_to_yaml(resolved), markup=False, highlight=False)
        return
    from stella_cli.train import run

    run_dir = run(resolved, resume=resume, quiet=quiet, stop_after=stop_after)  # TrainingInterrupted: exit 130
    if is_main():  # under torchrun only rank 0 prints the table and draws the plots
        print_summary(run_dir)
        write_run_plots(run_dir)


def write_run_plots(run_dir: Path) -> None:
    """The run's accuracy heatmap, stream plot and loss curves (RUN/plots/); a plot never fails a finished run."""
    try:
        from stella_cli.plots import plot_run

        paths = plot_run(run_dir)
    except Exception as err:  # noqa: BLE001  (the run is done; a figure problem is only reported)
        console.print(f"[yellow]plots not written: {escape(str(err))}")
        return
    if paths:
        console.print(f"plots: {', '.join(str(p) for p in paths)}")


@app.command()
def model(
    preset: str = typer.Option("base", help="Size preset: base (the paper's) | small | tiny."),
    recipe: Optional[Path] = typer.Option(None, help="Take the model and input sizes from this recipe instead."),
) -> None:
    """Parameter and token counts of a model size (base: the paper's ViT-B two-stream model)."""
    from stella_cli.config import MODEL_PRESETS, CHOICES, ModelConfig, load_recipe, resolve_model_preset
    from stella_cli.bench import model_summary

    if recipe is not None:
        r = load_recipe(recipe)
        cfg, d, s = r.model, r.data, r.method.stella
        sizes = dict(num_frames=d.num_frames, image_size=d.image_size, target_length=d.target_length,
                     num_mel_bins=d.num_mel_bins, core_video_ratio=s.core_video_ratio,
                     core_audio_ratio=s.core_audio_ratio)
    elif preset in MODEL_PRESETS:
        cfg, sizes = resolve_model_preset(ModelConfig(preset=preset)), {}
    else:
        raise StellaError(f"--preset {preset!r}: choose one of {', '.join(CHOICES['model.preset'])}")
    info = model_summary(cfg, **sizes)
    counts = [*info["params"]["parts"].items(), ("backbone", info["params"]["backbone"]),
              ("AVM", info["params"]["avm"]), ("total", info["params"]["total"])]
    print_rows(f"model {cfg.preset}: {cfg.embed_dim}-d, {cfg.num_heads} heads, {cfg.modality_depth}+"
               f"{cfg.fusion_depth} layers, decoder {cfg.decoder_embed_dim}-d x {cfg.decoder_depth}",
               [["parameters", "count"], *[[name, f"{n:,}"] for name, n in counts]])
    t = info["tokens"]
    console.print(f"tokens: video {t['video']}, audio {t['audio']}; visible at mask ratios "
                  f"{cfg.mask_ratio_v:g} / {cfg.mask_ratio_a:g}: {t['visible_video']} / {t['visible_audio']}; "
                  f"STELLA core {t['core_video']} / {t['core_audio']} "
                  f"(decoder {t['decoder_video']['core']} / {t['decoder_audio']['core']} instead of "
                  f"{t['decoder_video']['random']} / {t['decoder_audio']['random']})")


@app.command("eval")
def eval_command(
    targets: list[Path] = typer.Argument(None, help="Run directories or checkpoint files (default: the most recent "
                                                    "run under runs/). Several runs of one recipe: mean +- std."),
    task: str = typer.Option("all", help="all | retrieval | classification | localisation | ave | avs | msrvtt."),
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint of a run: taskNN or a file name under "
                                                        "RUN/checkpoints (default: the last task's)."),
    recipe: Optional[Path] = typer.Option(None, help="Recipe for a checkpoint file with none beside or inside it "
                                                     "(e.g. the authors' weights); for a run, instead of its "
                                                     "config.yaml."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set eval.ave.epochs=5."),
    quiet: bool = typer.Option(False, help="Tables only, no progress lines."),
) -> None:
    """Retrieval and the downstream tasks of a run or checkpoint; writes RUN/results/<task>.{json,md,csv}."""
    import sys

    from stella_cli.eval_run import run as run_eval

    run_eval(list(targets or []), task=task, recipe=recipe, overrides=overrides, checkpoint=checkpoint,
             command="stella " + " ".join(sys.argv[1:]), quiet=quiet)


convert_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints into the two-stream layout.")
app.add_typer(convert_app, name="convert")


@convert_app.command("mae")
def convert_mae_command(
    checkpoint: Path = typer.Argument(..., help="ImageNet MAE ViT checkpoint (e.g. mae_pretrain_vit_base_full.pth)."),
    out: Path = typer.Argument(..., help="Output state dict with the authors' CAV key names."),
    recipe: Optional[Path] = typer.Option(None, help="Recipe that will load OUT (model.checkpoint): take frames, "
                                                     "fbank length, mel bins and modality depth from it and check "
                                                     "that OUT fits its model."),
    num_frames: Optional[int] = typer.Option(None, help="Frames per clip (data.num_frames; default 4)."),
    target_length: Optional[int] = typer.Option(None, help="Fbank frames (data.target_length; default 1024)."),
    num_mel_bins: Optional[int] = typer.Option(None, help="Mel bins (data.num_mel_bins; default 128)."),
    modality_depth: Optional[int] = typer.Option(None, help="MAE blocks copied into both modality streams; the rest "
                                                            "fuse (model.modality_depth; default 10)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key of --recipe (repeatable)."),
    faithful_zeros: bool = typer.Option(True, help="Leave the tensors the authors' script never assigns at zero."),
) -> None:
    """Map an ImageNet MAE ViT checkpoint into the two-stream model, as tools/adapt_imae_weights_to_vamae.py."""
    from stella_cli.config import load_recipe
    from stella_cli.checkpoint import convert_mae_for_recipe

    resolved = load_recipe(recipe, overrides) if recipe is not None else None
    if overrides and recipe is None:
        raise StellaError("convert mae: --set needs --recipe")
    report = convert_mae_for_recipe(checkpoint, out, recipe=resolved, recipe_name=str(recipe),
                                    faithful_zeros=faithful_zeros, num_frames=num_frames,
                                    target_length=target_length, num_mel_bins=num_mel_bins,
                                    modality_depth=modality_depth)
    console.print(f"wrote {report['out']}: {report['mapped']} tensors mapped, {len(report['zeros'])} left at "
                  f"zero, {len(report['ignored'])} MAE tensors ignored")
    if recipe is not None:
        console.print(f"fits {recipe}: loads as its model.checkpoint")


@app.command()
def reproduce(
    table: str = typer.Argument("synthetic", help="synthetic | synthetic-ablation | synthetic-init | "
                                                  "vggsound-retrieval | audioset-retrieval | efficiency | downstream "
                                                  "| ablation; the analyses: {synthetic,vggsound,audioset}-{memory,"
                                                  "task-order,modality-gap,temperature}"),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default: the table's)."),
    methods: Optional[str] = typer.Option(None, help="Only these methods, e.g. finetune,er,stella."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key in every run (repeatable)."),
    full: bool = typer.Option(False, help="Every seed of the table (2021, 2022, 2023; the synthetic default runs 2021); "
                                          "the analyses: every method too."),
    runs: Path = typer.Option(Path("runs"), help="Runs go to RUNS/TABLE/<recipe>_s<seed>."),
    recipes: Path = typer.Option(Path("recipes"), help="Folder holding the tables' recipes; a recipe missing from "
                                                       "./recipes is the shipped one."),
    jobs: Optional[int] = typer.Option(None, help="Synthetic tables: runs side by side, one thread each "
                                                  "(default: one per core)."),
    values: Optional[str] = typer.Option(None, help="Memory and temperature tables: the values swept, e.g. "
                                                    "5,10,20,40 (default: the table's)."),
    orders: Optional[int] = typer.Option(None, help="Task-order tables: how many orders of the tasks (the "
                                                    "recipe's own, then seeded permutations; default 3)."),
) -> None:
    """Run every recipe a paper table needs (methods x seeds), resumably, then print the table."""
    from stella_cli.reproduce import reproduce as reproduce_table

    reproduce_table(table, seeds=seeds, methods=methods, overrides=overrides, full=full, runs=runs, recipes=recipes,
                    jobs=jobs, values=values, orders=orders)


@app.command()
def buffer(
    run_dir: Path = typer.Argument(..., help="Run directory (output.dir of a `stella train` run)."),
    checkpoint: str = typer.Option("latest.pt", help="Checkpoint file name under RUN/checkpoints."),
    show: int = typer.Option(0, help="Draw N stored clips (frames, fbank, importance, pruning probability, core "
                                     "patches) and the buffer's composition by task over the stream."),
    out: Optional[Path] = typer.Option(None, help="Folder for the --show figures (default: RUN/plots/buffer)."),
) -> None:
    """Inspect the replay buffer of a run: fill, stored fields and bytes, clips per task, pruning probabilities."""
    from stella_cli.checkpoint import read_checkpoint
    from stella_cli.config import load_recipe
    from stella_cli.replay import summarize_buffer

    path = run_dir / "checkpoints" / checkpoint
    state = read_checkpoint(path)  # one line for a missing, empty, truncated or foreign file
    if "buffer" not in state["method_extra"]:
        raise StellaError(f"{path}: method {state['recipe']['method']['name']!r} keeps no replay buffer")
    from stella_cli.cache import read_meta

    tasks = read_meta(Path(load_recipe(run_dir / "config.yaml").data.root))["tasks"]
    info = summarize_buffer(state["method_extra"]["buffer"], tasks)
    console.print(f"{path}: {info['filled']} / {info['capacity']} slots filled, {info['n_seen']} clips offered "
                  f"({len(info['ranks'])} rank(s)), {info['bytes'] / 2**20:.1f} MiB "
                  f"({info['bytes_per_clip'] / 1e6:.3f} MB per clip)")
    print_rows("stored per clip", [["field", "shape", "dtype", "bytes"]]
               + [[name, "x".join(map(str, f["shape"])) or "()", f["dtype"], f"{f['bytes_per_clip']:,}"]
                  for name, f in info["fields"].items()], left=4)
    if "clips_per_task" in info:
        console.print("clips per task: " + ", ".join(f"{t} {n}" for t, n in info["clips_per_task"].items()))
    for name in ("mean_p_v", "mean_p_a"):
        if name in info:
            console.print(f"{name} (pruning probability of the candidate patches): {info[name]:.3f}")
    if show < 0:
        raise StellaError(f"--show {show}: give a number of clips >= 0")
    if show:
        from stella_cli.plots import buffer_figures

        for written in buffer_figures(run_dir, show, out, checkpoint, buffer=state["method_extra"]["buffer"]):
            console.print(f"wrote {written}")


@app.command()
def report(
    runs: list[str] = typer.Argument(..., help="Run directories or globs (quoted: 'runs/synthetic_*'); for "
                                               "--table efficiency, `stella bench --json` files."),
    table: str = typer.Option("retrieval", help="retrieval | efficiency | downstream | ablation, or an analysis: "
                                                "memory | task-order | modality-gap | temperature"),
    out: Path = typer.Option(Path("reports"), help="Folder for TABLE.md/.csv/.json and the figures."),
    forgetting: str = typer.Option("conventional", help="conventional | as-coded (the authors' script, B15)."),
    plots: bool = typer.Option(True, help="Also write the figures (bars; heatmap, stream and loss curves per run)."),
) -> None:
    """The paper's tables over runs: seeds of one recipe grouped (mean ± std), best per column marked."""
    from stella_cli.analysis import ANALYSES, analysis_figure, build_analysis
    from stella_cli.errors import StellaError
    from stella_cli.report import TABLES, build_table, expand_runs, print_table, write_figures, write_table

    if table not in (*TABLES, *ANALYSES):
        raise StellaError(f"--table {table!r}: choose one of {', '.join((*TABLES, *ANALYSES))}")
    paths = expand_runs(runs, dirs=table != "efficiency")
    analysis = table in ANALYSES
    result = build_analysis(table, paths, forgetting) if analysis else build_table(table, paths, forgetting)
    written = write_table(result, out)
    print_table(result)
    if plots:
        written += [analysis_figure(result, out)] if analysis else write_figures(result, out)
    console.print("wrote " + ", ".join(str(p) for p in written))


@app.command()
def bench(
    methods: str = typer.Option("all", help="all, or a comma-separated list, e.g. stella,derpp,finetune."),
    preset: str = typer.Option("base", help="Model size: base (the paper's) | small | tiny."),
    batch: int = typer.Option(2, help="Current clips per iteration (replaying methods add their replay rows)."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    attention: str = typer.Option("sdpa", help="sdpa (default kernel) | math (the authors' explicit softmax(q k^T) v, "
                                               "which keeps the attention maps for backward)."),
    steps: int = typer.Option(2, help="Timed iterations per method (after the buffer-filling steps)."),
    memory: Optional[int] = typer.Option(None, help="Replay slots, filled before timing (default 5 x batch: "
                                                    "MIR's candidate pool)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of the table."),
) -> None:
    """Time and memory of one training iteration of each method, as ratios to DER++ (paper input sizes)."""
    import json

    from stella_cli.bench import parse_methods, reference_note, run_bench

    names = parse_methods(methods)
    status = Console(stderr=True)
    rows = run_bench(names, preset=preset, batch=batch, device=device, attention=attention, steps=steps,
                     memory=memory, progress=lambda text: status.print(f"[dim]measuring {text}"))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    unit = 2**20
    print_rows(f"stella bench: preset {preset}, batch {batch}, {attention} attention, {device}",
               [["method", "s / iter", "x", "activations MiB", "x", "peak MiB", "x"]]
               + [[r["method"], f"{r['iter_s']:.3f}", f"{r['iter_ratio']:.2f}", f"{r['activation_bytes'] / unit:,.1f}",
                   f"{r['activation_ratio']:.2f}", f"{r['peak_bytes'] / unit:,.1f}", f"{r['peak_ratio']:.2f}"]
                  for r in rows])
    peak = "CUDA max allocated" if device == "cuda" else "growth of the peak RSS over the size before training"
    console.print(f"activations = bytes saved for backward (distinct storages, parameters excluded); peak = {peak}; "
                  f"{reference_note(rows)}")


def print_summary(run_dir: Path) -> None:
    """The paper's table layout for one run: A and F (both definitions) per direction and R@K."""
    import json

    from stella_cli.evaluate import summary_table

    path = run_dir / "results" / "summary.json"
    if not path.is_file():
        return
    print_rows(f"zero-shot retrieval, {run_dir}", summary_table(json.loads(path.read_text())), left=0)
    console.print(f"results in {run_dir / 'results'} (retrieval.json, summary.md, summary.csv)")


def print_prep_summary(summary: dict) -> None:
    """summary = {'out', 'splits': {split: {task: clips}}, 'skipped': {split: n}, 'seconds', 'bytes'}."""
    splits = list(summary["splits"])
    tasks = list(dict.fromkeys(t for s in splits for t in summary["splits"][s]))
    print_rows(f"prepared {summary['out']}", [["task", *splits]]
               + [[t, *[str(summary["splits"][s].get(t, 0)) for s in splits]] for t in tasks]
               + [["[bold]total", *[str(sum(summary["splits"][s].values())) for s in splits]],
                  ["skipped", *[str(summary["skipped"].get(s, 0)) for s in splits]]])
    console.print(f"{summary['seconds']:.1f} s, {summary['bytes'] / 2**20:.1f} MiB on disk")
    for split, clips in summary.get("skipped_clips", {}).items():
        for item in clips[:5]:
            console.print(f"[yellow]skipped[/yellow] {split} {escape(item['clip_id'])}: {escape(item['reason'])}")
        if len(clips) > 5:
            console.print(f"  ... and {len(clips) - 5} more {split} clips")
    for note in summary.get("warnings", []):
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    if summary.get("report"):
        console.print(f"every skipped clip and its reason: {summary['report']}")
