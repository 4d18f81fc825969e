"""`stella` command line: each command parses its options and calls one function elsewhere."""

from __future__ import annotations

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


def main() -> None:
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
) -> None:
    """Continual pre-training over the recipe's task sequence, with retrieval after every task."""
    from stella_cli.config import load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, overrides)
    if print_config:
        console.print(recipe_to_yaml(resolved), markup=False, highlight=False)
        return
    from stella_cli.train import TrainingInterrupted, run

    try:
        run_dir = run(resolved, resume=resume, quiet=quiet)
    except TrainingInterrupted as stop:
        console.print(f"[yellow]{stop}")
        raise SystemExit(130)
    print_summary(run_dir)


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
