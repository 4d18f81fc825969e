"""`stella eval`: score a run or a checkpoint on retrieval and the downstream tasks (stella_spec §6).

A target is a run directory (its config.yaml and task checkpoints), one checkpoint file (ours, with the recipe
beside it or inside it, or the authors' state dict with --recipe), or nothing: the most recent run under runs/.
Each task writes results/<task>.{json,md,csv}; the json names the checkpoint, the recipe and the command. Several
runs of one recipe (different seeds) also get the mean and standard deviation of every metric.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from stella_cli import evaluate
from stella_cli.cache import atomic_write_text
from stella_cli.config import Recipe, RecipeError, load_recipe, recipe_from_dict, recipe_to_dict
from stella_cli.data import check_prepared
from stella_cli.heads import TaskSkipped
from stella_cli.model import CAVMAE, is_run_checkpoint, load_authors_checkpoint

console = Console()
STREAM_TASKS = ("retrieval", "localisation")  # tasks scored on the recipe's own retrieval split
CHECKPOINT_NAME = re.compile(r"task(\d+)_(.+)\.pt")  # task checkpoints written by `stella train`


@dataclass
class Target:
    """What one `stella eval` argument resolves to."""

    label: str  # run (or checkpoint) name, for tables
    recipe: Recipe
    recipe_path: str  # the recipe file the result names
    checkpoints: list[Path]  # task checkpoints in stream order, ending with `final`
    final: Path  # the checkpoint the downstream tasks use
    results_dir: Path
    run_dir: Path | None = None


@dataclass
class Loaded:
    """A checkpoint's backbone (eval mode, on the device) and, for our checkpoints, the method's other weights."""

    backbone: CAVMAE
    method_state: dict[str, torch.Tensor]  # e.g. the AVM (keys "avm.*"); empty for a bare state dict
    step: int | None


# ----------------------------------------------------------------------------------------------------------
# targets


def latest_run(runs_root: Path = Path("runs")) -> Path:
    """The run directory under runs/ whose newest checkpoint is the most recent."""
    runs = [d for d in runs_root.glob("*") if (d / "config.yaml").is_file() and list((d / "checkpoints").glob("*.pt"))]
    if not runs:
        raise FileNotFoundError(f"{runs_root}/: no run with checkpoints; train one (`stella train RECIPE`) or give a "
                                "run directory or checkpoint")
    return max(runs, key=lambda d: max(p.stat().st_mtime for p in (d / "checkpoints").glob("*.pt")))


def task_checkpoints(run_dir: Path) -> list[Path]:
    """taskNN_<name>.pt of a run, in stream order."""
    found = [p for p in (run_dir / "checkpoints").glob("task*.pt") if CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def pick_checkpoint(run_dir: Path, checkpoint: str | None) -> tuple[list[Path], Path]:
    """(task checkpoints up to the chosen one, the chosen one); `checkpoint` is taskNN, a file name, or None = last."""
    tasks = task_checkpoints(run_dir)
    if checkpoint is None:
        if tasks:
            return tasks, tasks[-1]
        latest = run_dir / "checkpoints" / "latest.pt"
        if latest.is_file():
            return [latest], latest
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint (has the run finished a task?)")
    for i, p in enumerate(tasks):
        if p.name == checkpoint or p.name.startswith(checkpoint + "_") or p.stem == checkpoint:
            return tasks[: i + 1], p
    path = run_dir / "checkpoints" / checkpoint
    if path.is_file():
        return [path], path
    names = ", ".join(p.name for p in tasks) or "none"
    raise FileNotFoundError(f"--checkpoint {checkpoint}: not in {run_dir / 'checkpoints'} (task checkpoints: {names})")


def resolve_target(arg: Path | None, *, recipe: Path | None, overrides: list[str], checkpoint: str | None,
                   runs_root: Path = Path("runs")) -> Target:
    """A run directory, a checkpoint file, or None (the latest run) -> Target."""
    path = latest_run(runs_root) if arg is None else Path(arg)
    if path.is_dir():
        config = path / "config.yaml"
        recipe_file = recipe or config
        if not Path(recipe_file).is_file():
            raise FileNotFoundError(f"{config}: not a run directory (no config.yaml); give --recipe")
        checkpoints, final = pick_checkpoint(path, checkpoint)
        return Target(path.name, load_recipe(recipe_file, overrides), str(recipe_file), checkpoints, final,
                      path / "results", path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such run directory or checkpoint")
    if checkpoint is not None:
        raise ValueError(f"--checkpoint {checkpoint} picks a checkpoint of a run directory; {path} is a file")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    if recipe is not None:
        resolved, recipe_path = load_recipe(recipe, overrides), str(recipe)
    elif run_dir is not None and (run_dir / "config.yaml").is_file():
        resolved, recipe_path = load_recipe(run_dir / "config.yaml", overrides), str(run_dir / "config.yaml")
    else:
        state = _load(path)
        if not (isinstance(state, dict) and isinstance(state.get("recipe"), dict)):
            raise ValueError(f"{path}: no recipe beside or inside the checkpoint; give --recipe RECIPE")
        resolved = _apply_overrides(recipe_from_dict(state["recipe"], source=str(path)), overrides, str(path))
        recipe_path = f"{path} (embedded)"
    results = run_dir / "results" if run_dir is not None else path.parent / f"eval_{path.stem}" / "results"
    return Target(run_dir.name if run_dir else path.stem, resolved, recipe_path, [path], path, results, run_dir)


def _apply_overrides(recipe: Recipe, overrides: list[str], source: str) -> Recipe:
    if not overrides:
        return recipe
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(recipe_to_dict(recipe), fh)
    try:
        return load_recipe(fh.name, overrides)
    finally:
        Path(fh.name).unlink()


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # not a torch file at all
        raise ValueError(f"{path}: cannot read as a checkpoint: {err}") from err


def load_checkpoint(path: Path, recipe: Recipe, device: torch.device) -> Loaded:
    """Build the recipe's backbone and load `path`: our checkpoint ({"model", "method", ...}) or, through the key
    mapping of load_authors_checkpoint, the authors' state dict."""
    d = recipe.data
    backbone = CAVMAE(recipe.model, d.num_frames, d.image_size, d.target_length, d.num_mel_bins)
    state = _load(path)
    if is_run_checkpoint(state):
        backbone.load_state_dict(state["model"])
        loaded = Loaded(backbone, dict(state["method"]), state.get("position", {}).get("step"))
    else:
        load_authors_checkpoint(backbone, state if isinstance(state, dict) else path)
        loaded = Loaded(backbone, {}, None)
    loaded.backbone.to(device).eval().requires_grad_(False)
    return loaded


# ----------------------------------------------------------------------------------------------------------
# tasks


@dataclass
class Context:
    target: Target
    device: torch.device
    amp: torch.dtype | None
    quiet: bool
    all_tasks: list[str]


def run_retrieval(ctx: Context) -> tuple[dict[str, Any], list[list[str]]]:
    """One row of the accuracy matrix per task checkpoint (the whole run), or one row for a single checkpoint."""
    r, history = ctx.target.recipe, []
    for path in ctx.target.checkpoints:
        loaded = load_checkpoint(path, r, ctx.device)
        m = CHECKPOINT_NAME.fullmatch(path.name)
        scores = evaluate.gallery_scores(loaded.backbone, r, ctx.all_tasks, ctx.device, ctx.amp)
        history.append({"after_task": m.group(2) if m else path.stem, "step": loaded.step, "checkpoint": str(path),
                        "scores": scores})
        log(ctx, f"retrieval after {history[-1]['after_task']}: A->V R@1 {scores['a2v']['all']['R@1']:.1f}, "
                 f"V->A R@1 {scores['v2a']['all']['R@1']:.1f}")
    summary = evaluate.summarize(history, ctx.all_tasks, r.eval.recall_at)
    result = {"task": "retrieval", "metrics": evaluate.flat_metrics(summary), "tasks": ctx.all_tasks,
              "rows": history, "summary": summary}
    return result, evaluate.summary_table(summary)


def log(ctx: Context, message: str) -> None:
    if not ctx.quiet:
        console.print(message)


def _lazy(module: str, name: str) -> Callable[[Context], tuple[dict[str, Any], list[list[str]]]]:
    """A task function of another module, imported when the task runs (the task modules import this one)."""
    def call(ctx: Context) -> tuple[dict[str, Any], list[list[str]]]:
        return getattr(importlib.import_module(module), name)(ctx)
    return call


# `stella eval --task` choices; each returns (result without provenance, table rows with a header row)
TASKS: dict[str, Callable[[Context], tuple[dict[str, Any], list[list[str]]]]] = {
    "retrieval": run_retrieval,
    "classification": _lazy("stella_cli.probe", "run_classification"),
    "localisation": _lazy("stella_cli.localisation", "run_localisation"),
    "ave": _lazy("stella_cli.ave", "run_ave"),
    "avs": _lazy("stella_cli.avs", "run_avs"),
    "msrvtt": _lazy("stella_cli.msrvtt", "run_msrvtt"),
}


# ----------------------------------------------------------------------------------------------------------
# entry point


def run(targets: list[Path], *, task: str = "all", recipe: Path | None = None, overrides: list[str] = (),
        checkpoint: str | None = None, command: str = "stella eval", quiet: bool = False,
        runs_root: Path = Path("runs")) -> dict[str, list[dict[str, Any]]]:
    """Evaluate every target on `task` (or all tasks); returns {task: [result of each target]} (+ 'mean')."""
    choices = ["all", *TASKS]
    if task not in choices:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(choices)}")
    tasks = list(TASKS) if task == "all" else [task]
    resolved = [resolve_target(t, recipe=recipe, overrides=list(overrides), checkpoint=checkpoint,
                               runs_root=runs_root) for t in (targets or [None])]
    if len(resolved) > 1:
        check_same_recipe(resolved)
    from stella_cli.train import amp_dtype, setup_distributed

    _, _, device = setup_distributed(resolved[0].recipe.train.device)
    out: dict[str, list[dict[str, Any]]] = {}
    for target in resolved:
        data = target.recipe.data
        if any(t in tasks for t in STREAM_TASKS):
            stream_tasks = data.tasks or check_prepared(data, ("retrieval",))["tasks"]
        else:  # downstream tasks on their own data: the stream's folder need not be here
            stream_tasks = data.tasks
        ctx = Context(target, device, amp_dtype(target.recipe.optim, device), quiet, stream_tasks)
        for name in tasks:
            tic = time.perf_counter()
            try:
                result, table = TASKS[name](ctx)
            except TaskSkipped as skip:
                if task != "all":
                    raise
                console.print(f"[yellow]skipped {name}:[/yellow] {skip}")
                continue
            result = {"task": name, "checkpoint": str(target.final), "recipe": target.recipe_path,
                      "command": command, **result, "seconds": round(time.perf_counter() - tic, 1)}
            path = evaluate.write_task_result(target.results_dir, result, table)
            if name == "retrieval":  # the loop's summary files, recomputed
                evaluate.write_table(target.results_dir, "summary", table)
                atomic_write_text(target.results_dir / "summary.json", json.dumps(result["summary"], indent=1))
            out.setdefault(name, []).append(result)
            print_table(f"{name}, {target.label} ({target.final.name}, {result['seconds']:.0f} s)", table)
            console.print(f"wrote {path.with_suffix('.{json,md,csv}')}")
    if len(resolved) > 1:
        for name, results in list(out.items()):
            mean = seed_summary(results)
            out_dir = resolved[0].results_dir.parent.parent / f"{resolved[0].label}_seeds" / "results"
            table = [["metric", "mean", "std", "n"]] + [[k, f"{v['mean']:.2f}", f"{v['std']:.2f}", str(v["n"])]
                                                         for k, v in mean["per_metric"].items()]
            record = {"task": name, "checkpoint": [r["checkpoint"] for r in results],
                      "recipe": [t.recipe_path for t in resolved], "command": command,
                      "metrics": {k: v["mean"] for k, v in mean["per_metric"].items()}, **mean}
            evaluate.write_task_result(out_dir, record, table)
            print_table(f"{name}: mean +- std over {len(results)} runs", table)
            out.setdefault("mean", []).append(record)
    return out


def check_same_recipe(targets: list[Target]) -> None:
    """Seeds of one recipe: recipes may differ only in train.seed and output.dir."""
    def key(t: Target) -> dict:
        d = recipe_to_dict(t.recipe)
        d["train"] = {k: v for k, v in d["train"].items() if k != "seed"}
        d["output"] = {}
        return d

    first = key(targets[0])
    for t in targets[1:]:
        if key(t) != first:
            raise RecipeError(f"{t.recipe_path}: differs from {targets[0].recipe_path} in more than train.seed and "
                              "output.dir; mean +- std is only taken over seeds of one recipe")


def seed_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """{'per_metric': {name: {'mean', 'std' (sample, ddof 1; 0 for one run), 'n'}}} over the runs' metrics."""
    names = [k for k in results[0]["metrics"] if all(k in r["metrics"] for r in results)]
    per = {}
    for k in names:
        values = [float(r["metrics"][k]) for r in results]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        per[k] = {"mean": mean, "std": math.sqrt(var), "n": len(values)}
    return {"per_metric": per}


def print_table(title: str, rows: list[list[str]]) -> None:
    table = Table(title=title)
    for i, name in enumerate(rows[0]):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)


