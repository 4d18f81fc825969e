"""`stella eval`: score a run or a checkpoint on retrieval and the downstream tasks (method.md §6).

A target is a run directory (its config.yaml and task checkpoints), one checkpoint file (ours, with the recipe
beside it or inside it, or the authors' state dict with --recipe), or nothing: the most recent run under runs/.
Each task writes results/<task>.{json,md,csv}; the json names the checkpoint, the recipe and the command. Several
runs of one recipe (different seeds) also get the mean and standard deviation of every metric.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from stella_cli import evaluate
from stella_cli.ave import run_ave
from stella_cli.avs import run_avs
from stella_cli.checkpoint import latest_run, pick_checkpoint, read_any, task_of
from stella_cli.config import RecipeError, load_recipe, recipe_from_dict, recipe_to_dict
from stella_cli.console import console, print_rows
from stella_cli.data import check_prepared
from stella_cli.distributed import amp_dtype, setup_distributed
from stella_cli.downstream import Context, Target, TaskSkipped
from stella_cli.errors import StellaError
from stella_cli.files import atomic_write_text
from stella_cli.localisation import run_localisation
from stella_cli.msrvtt import run_msrvtt
from stella_cli.probe import run_classification

STREAM_TASKS = ("retrieval", "localisation")  # tasks scored on the recipe's own retrieval split


# ----------------------------------------------------------------------------------------------------------
# targets


def resolve_target(arg: Path | None, *, recipe: Path | None, overrides: list[str], checkpoint: str | None,
                   runs_root: Path = Path("runs")) -> Target:
    """A run directory, a checkpoint file, or None (the latest run) -> Target."""
    path = latest_run(runs_root) if arg is None else Path(arg)
    if path.is_dir():
        config = path / "config.yaml"
        recipe_file = recipe or config
        if not Path(recipe_file).is_file():
            raise StellaError(f"{config}: not a run directory (no config.yaml); give --recipe")
        checkpoints, final = pick_checkpoint(path, checkpoint)
        return Target(path.name, load_recipe(recipe_file, overrides), str(recipe_file), checkpoints, final,
                      path / "results", path)
    if not path.is_file():
        raise StellaError(f"{path}: no such run directory or checkpoint")
    if checkpoint is not None:
        raise StellaError(f"--checkpoint {checkpoint} picks a checkpoint of a run directory; {path} is a file")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    if recipe is not None:
        resolved, recipe_path = load_recipe(recipe, overrides), str(recipe)
    elif run_dir is not None and (run_dir / "config.yaml").is_file():
        resolved, recipe_path = load_recipe(run_dir / "config.yaml", overrides), str(run_dir / "config.yaml")
    else:
        state = read_any(path)
        if not (isinstance(state, dict) and isinstance(state.get("recipe"), dict)):
            raise StellaError(f"{path}: no recipe beside or inside the checkpoint; give --recipe RECIPE")
        resolved = recipe_from_dict(state["recipe"], source=str(path), overrides=overrides)
        recipe_path = f"{path} (embedded)"
    results = run_dir / "results" if run_dir is not None else path.parent / f"eval_{path.stem}" / "results"
    return Target(run_dir.name if run_dir else path.stem, resolved, recipe_path, [path], path, results, run_dir)


# ----------------------------------------------------------------------------------------------------------
# tasks


def run_retrieval(ctx: Context) -> tuple[dict[str, Any], list[list[str]]]:
    """One row of the accuracy matrix per task checkpoint (the whole run), or one row for a single checkpoint."""
    r, history = ctx.target.recipe, []
    for path in ctx.target.checkpoints:
        loaded = ctx.load(path)
        row = evaluate.gallery_row(loaded.backbone, r, ctx.all_tasks, ctx.device, ctx.amp)  # scores, modality gap
        scores = row["scores"]
        history.append({"after_task": task_of(path), "step": loaded.step, "checkpoint": str(path), **row})
        ctx.log(f"retrieval after {history[-1]['after_task']}: A->V R@1 {scores['a2v']['all']['R@1']:.1f}, "
                f"V->A R@1 {scores['v2a']['all']['R@1']:.1f}")
    summary = evaluate.summarize(history, ctx.all_tasks, r.eval.recall_at)
    result = {"task": "retrieval", "metrics": evaluate.flat_metrics(summary), "tasks": ctx.all_tasks,
              "rows": history, "summary": summary}
    return result, evaluate.summary_table(summary)


# `stella eval --task` choices; each returns (result without provenance, table rows with a header row)
TASKS: dict[str, Callable[[Context], tuple[dict[str, Any], list[list[str]]]]] = {
    "retrieval": run_retrieval,
    "classification": run_classification,
    "localisation": run_localisation,
    "ave": run_ave,
    "avs": run_avs,
    "msrvtt": run_msrvtt,
}


# ----------------------------------------------------------------------------------------------------------
# entry point


def run(targets: list[Path], *, task: str = "all", recipe: Path | None = None, overrides: list[str] = (),
        checkpoint: str | None = None, command: str = "stella eval", quiet: bool = False,
        runs_root: Path = Path("runs")) -> dict[str, list[dict[str, Any]]]:
    """Evaluate every target on `task` (or all tasks); returns {task: [result of each target]} (+ 'mean')."""
    choices = ["all", *TASKS]
    if task not in choices:
        raise StellaError(f"--task {task!r}: choose one of {', '.join(choices)}")
    tasks = list(TASKS) if task == "all" else [task]
    resolved = [resolve_target(t, recipe=recipe, overrides=list(overrides), checkpoint=checkpoint,
                               runs_root=runs_root) for t in (targets or [None])]
    if len(resolved) > 1:
        check_same_recipe(resolved)
    _, _, device = setup_distributed(resolved[0].recipe.train.device)
    out: dict[str, list[dict[str, Any]]] = {}
    for target in resolved:
        data = target.recipe.data
        if any(t in tasks for t in STREAM_TASKS):
            stream_tasks = data.tasks or check_prepared(data, ("retrieval",))["tasks"]
        else:  # downstream tasks on their own data: the stream's folder need not be here
            stream_tasks = data.tasks
        ctx = Context(target, device, amp_dtype(target.recipe.optim.amp, device), quiet, stream_tasks)
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
            print_rows(f"{name}, {target.label} ({target.final.name}, {result['seconds']:.0f} s)", table)
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
            print_rows(f"{name}: mean +- std over {len(results)} runs", table)
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
        mean, std, n = evaluate.mean_std([float(r["metrics"][k]) for r in results])
        per[k] = {"mean": mean, "std": std or 0.0, "n": n}
    return {"per_metric": per}
