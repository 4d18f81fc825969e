"""`stella` command line: each command parses its options and calls one function elsewhere."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="STELLA: continual audio-video pre-training (ICML 2024), its baselines and evaluation.",
)
console = Console()
DEFAULT_SYNTHETIC_OUT = Path("data/synthetic")  # where recipes/synthetic.yaml looks for it


@app.callback()
def _root() -> None:
    """STELLA: continual audio-video pre-training (ICML 2024), its baselines and evaluation."""


# OpenMP waiting (README "Speed where users wait"). torch's OpenMP (libgomp) lets a thread that waits for the others
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
    set_openmp_defaults()  # before any command imports torch
    try:
        app()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # bad input: one clear line, no traceback
        console.print(f"[red]error:[/red] {err}")
        raise SystemExit(2)


@app.command()
def prep(
    dataset: str = typer.Argument("synthetic", help="synthetic | vggsound | audioset"),
    out: Optional[Path] = typer.Option(None, help="Output data folder (default: data/synthetic for synthetic)."),
    list_file: Optional[str] = typer.Option(
        None, "--list", help="Clip list per split: SPLIT=FILE, comma-joined (train and test required, retrieval "
                             "optional); FILE a CAV-MAE json or the authors' STELLA csv; or a folder holding them "
                             "under their usual names. Without --list: ROOT/{train,test}/CLASS/*.mp4."),
    root: Optional[Path] = typer.Option(None, help="Folder holding the clips (raw mp4/mkv/webm or extracted)."),
    categories: Optional[Path] = typer.Option(
        None, help="Class -> category table (VGGSound stat.csv, AudioSet class lists)."),
    labels: Optional[Path] = typer.Option(None, help="CAV-MAE label csv (index,mid,display_name)."),
    workers: int = typer.Option(2, help="Parallel worker processes."),
    frames_format: str = typer.Option("raw", help="Frame cache: raw (uint8 memmap, fastest) | jpeg (~5x smaller)."),
    seed: int = typer.Option(0, help="Synthetic only: generator seed."),
    fmt: str = typer.Option("cache", "--format", help="Synthetic only: cache (direct) | mp4 (encode real mp4 "
                                                       "files and prepare them through the decoding path)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Build a dataset: manifests + feature cache (synthetic benchmark, VGGSound, AudioSet)."""
    if dataset == "synthetic":
        from stella_cli.synth import prepare_synthetic

        summary = prepare_synthetic(out or DEFAULT_SYNTHETIC_OUT, seed=seed, fmt=fmt, workers=workers,
                                    frames_format=frames_format, progress=not quiet)
    elif dataset in ("vggsound", "audioset"):
        from stella_cli.prep import prepare_real

        if out is None:
            raise ValueError(f"stella prep {dataset}: --out DATA_DIR is required")
        summary = prepare_real(dataset, out=out, list_file=list_file, root=root, categories=categories,
                               labels=labels, workers=workers, frames_format=frames_format, progress=not quiet)
    else:
        raise ValueError(f"stella prep: unknown dataset {dataset!r}; choose synthetic, vggsound or audioset")
    print_prep_summary(summary)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/synthetic.yaml."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set optim.lr=5e-5 "
                                                          "(repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in output.dir from its latest checkpoint."),
    print_config: bool = typer.Option(False, help="Print the resolved recipe and exit."),
    quiet: bool = typer.Option(False, help="No progress bars, log lines only."),
    stop_after: Optional[int] = typer.Option(None, help="Stop with a checkpoint after this many optimiser steps "
                                                        "in total (e.g. a time-limited job); continue with --resume."),
) -> None:
    """Continual pre-training over the recipe's task sequence, with retrieval after every task."""
    from stella_cli.config import load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, overrides)
    if print_config:
        console.print(recipe_to_yaml(resolved), markup=False, highlight=False)
        return
    from stella_cli.train import TrainingInterrupted, run

    try:
        run_dir = run(resolved, resume=resume, quiet=quiet, stop_after=stop_after)
    except TrainingInterrupted as stop:
        console.print(f"[yellow]{stop}")
        raise SystemExit(130)
    print_summary(run_dir)


@app.command()
def model(
    preset: str = typer.Option("base", help="Size preset: base (the paper's) | small | tiny."),
    recipe: Optional[Path] = typer.Option(None, help="Take the model and input sizes from this recipe instead."),
) -> None:
    """Parameter and token counts of a model size (base: the paper's ViT-B two-stream model)."""
    from stella_cli.config import MODEL_PRESETS, CHOICES, ModelConfig, load_recipe, resolve_model_preset
    from stella_cli.model import model_summary

    if recipe is not None:
        r = load_recipe(recipe)
        cfg, d, s = r.model, r.data, r.method.stella
        sizes = dict(num_frames=d.num_frames, image_size=d.image_size, target_length=d.target_length,
                     num_mel_bins=d.num_mel_bins, core_video_ratio=s.core_video_ratio,
                     core_audio_ratio=s.core_audio_ratio)
    elif preset in MODEL_PRESETS:
        cfg, sizes = resolve_model_preset(ModelConfig(preset=preset)), {}
    else:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(CHOICES['model.preset'])}")
    info = model_summary(cfg, **sizes)
    table = Table(title=f"model {cfg.preset}: {cfg.embed_dim}-d, {cfg.num_heads} heads, {cfg.modality_depth}+"
                        f"{cfg.fusion_depth} layers, decoder {cfg.decoder_embed_dim}-d x {cfg.decoder_depth}")
    table.add_column("parameters")
    table.add_column("count", justify="right")
    for name, n in [*info["params"]["parts"].items(), ("backbone", info["params"]["backbone"]),
                    ("AVM", info["params"]["avm"]), ("total", info["params"]["total"])]:
        table.add_row(name, f"{n:,}")
    console.print(table)
    t = info["tokens"]
    console.print(f"tokens: video {t['video']}, audio {t['audio']}; visible at mask ratios "
                  f"{cfg.mask_ratio_v:g} / {cfg.mask_ratio_a:g}: {t['visible_video']} / {t['visible_audio']}; "
                  f"STELLA core {t['core_video']} / {t['core_audio']} "
                  f"(decoder {t['decoder_video']['core']} / {t['decoder_audio']['core']} instead of "
                  f"{t['decoder_video']['random']} / {t['decoder_audio']['random']})")


convert_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints into the two-stream layout.")
app.add_typer(convert_app, name="convert")


@convert_app.command("mae")
def convert_mae_command(
    checkpoint: Path = typer.Argument(..., help="ImageNet MAE ViT checkpoint (e.g. mae_pretrain_vit_base_full.pth)."),
    out: Path = typer.Argument(..., help="Output state dict with the authors' CAV key names."),
    modality_depth: int = typer.Option(10, help="MAE blocks copied into both modality streams; the rest fuse."),
    faithful_zeros: bool = typer.Option(True, help="Leave the tensors the authors' script never assigns at zero."),
) -> None:
    """Map an ImageNet MAE ViT checkpoint into the two-stream model, as tools/adapt_imae_weights_to_vamae.py."""
    from stella_cli.model import convert_mae

    report = convert_mae(checkpoint, out, modality_depth=modality_depth, faithful_zeros=faithful_zeros)
    console.print(f"wrote {report['out']}: {report['mapped']} tensors mapped, {len(report['zeros'])} left at "
                  f"zero, {len(report['ignored'])} MAE tensors ignored")


@app.command()
def buffer(
    run_dir: Path = typer.Argument(..., help="Run directory (output.dir of a `stella train` run)."),
    checkpoint: str = typer.Option("latest.pt", help="Checkpoint file name under RUN/checkpoints."),
) -> None:
    """Inspect the replay buffer of a run: fill, stored fields and bytes, clips per task, pruning probabilities."""
    import torch

    from stella_cli.config import load_recipe
    from stella_cli.replay import summarize_buffer

    path = run_dir / "checkpoints" / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "buffer" not in state["method_extra"]:
        raise ValueError(f"{path}: method {state['recipe']['method']['name']!r} keeps no replay buffer")
    from stella_cli.cache import read_meta

    tasks = read_meta(Path(load_recipe(run_dir / "config.yaml").data.root))["tasks"]
    info = summarize_buffer(state["method_extra"]["buffer"], tasks)
    console.print(f"{path}: {info['filled']} / {info['capacity']} slots filled, {info['n_seen']} clips offered "
                  f"({len(info['ranks'])} rank(s)), {info['bytes'] / 2**20:.1f} MiB "
                  f"({info['bytes_per_clip'] / 1e6:.3f} MB per clip)")
    table = Table(title="stored per clip")
    for column in ("field", "shape", "dtype", "bytes"):
        table.add_column(column)
    for name, f in info["fields"].items():
        table.add_row(name, "x".join(map(str, f["shape"])) or "()", f["dtype"], f"{f['bytes_per_clip']:,}")
    console.print(table)
    if "clips_per_task" in info:
        console.print("clips per task: " + ", ".join(f"{t} {n}" for t, n in info["clips_per_task"].items()))
    for name in ("mean_p_v", "mean_p_a"):
        if name in info:
            console.print(f"{name} (pruning probability of the candidate patches): {info[name]:.3f}")


def print_summary(run_dir: Path) -> None:
    """The paper's table layout for one run: A and F (both definitions) per direction and R@K."""
    import json

    from stella_cli.evaluate import summary_table

    path = run_dir / "results" / "summary.json"
    if not path.is_file():
        return
    rows = summary_table(json.loads(path.read_text()))
    table = Table(title=f"zero-shot retrieval, {run_dir}")
    for name in rows[0]:
        table.add_column(name, justify="right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
    console.print(f"results in {run_dir / 'results'} (retrieval.json, summary.md, summary.csv)")


def print_prep_summary(summary: dict) -> None:
    """summary = {'out', 'splits': {split: {task: clips}}, 'skipped': {split: n}, 'seconds', 'bytes'}."""
    table = Table(title=f"prepared {summary['out']}")
    splits = list(summary["splits"])
    tasks = list(dict.fromkeys(t for s in splits for t in summary["splits"][s]))
    table.add_column("task")
    for s in splits:
        table.add_column(s, justify="right")
    for t in tasks:
        table.add_row(t, *[str(summary["splits"][s].get(t, 0)) for s in splits])
    table.add_row("[bold]total", *[str(sum(summary["splits"][s].values())) for s in splits])
    table.add_row("skipped", *[str(summary["skipped"].get(s, 0)) for s in splits])
    console.print(table)
    console.print(f"{summary['seconds']:.1f} s, {summary['bytes'] / 2**20:.1f} MiB on disk")
    for split, clips in summary.get("skipped_clips", {}).items():
        for item in clips[:5]:
            console.print(f"[yellow]skipped[/yellow] {split} {escape(item['clip_id'])}: {escape(item['reason'])}")
        if len(clips) > 5:
            console.print(f"  ... and {len(clips) - 5} more {split} clips")
    if summary.get("report"):
        console.print(f"every skipped clip and its reason: {summary['report']}")
