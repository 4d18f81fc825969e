"""`stella report --table memory | task-order | modality-gap | temperature`: the paper's analyses beyond its tables.

    memory        rows = method x method.memory_size M; columns = the memory in MiB (M x the bytes of one stored
                  clip, which `stella train` reads from its buffer), A and F of R@K avg per direction; best per
                  column among the methods of one M
    task-order    rows = methods, each run over several orders of the tasks (data.tasks): A and F as mean ± std over
                  the orders (and seeds), the method's rank in each order and its mean rank
    modality-gap  rows = methods: after every task, the distance between the audio and the video centroids and the
                  spread of each (evaluate.modality_gap, recorded with every accuracy-matrix row)
    temperature   rows = STELLA / STELLA+ per method.stella.att_temperature: A and F per direction; best per column
                  among the temperatures of one method

Each is a report.Table (written and printed like the paper's tables) and one figure. Runs are read as
`stella report` reads them, config.yaml and results/ (summary.json, retrieval.json), never a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogLocator

from stella_cli.errors import StellaError
from stella_cli.evaluate import DIRECTIONS, mean_std
from stella_cli.factory import REPLAY_METHODS
from stella_cli.plots import STYLE, _save
from stella_cli.report import (DIRECTION_NAMES, FORGETTING, Group, Run, Table, _disambiguate, display_name, flatten,
                               group_runs, is_upper_bound, load_run, mark_best, method_rank, recipe_key)

ANALYSES = ("memory", "task-order", "modality-gap", "temperature")
SWEPT = {"memory": "method.memory_size", "temperature": "method.stella.att_temperature"}  # the key a sweep varies
SWEPT_SHORT = {"memory": "M", "temperature": "τ"}  # in row labels: "STELLA (M = 20)"
AF_COLUMNS = [f"{DIRECTION_NAMES[d]} avg {s}" for d in DIRECTIONS for s in ("A", "F")]
MIB = "memory (MiB)"
GAP_PARTS = {"gap": "gap", "spread_a": "spread audio", "spread_v": "spread video"}  # modality_gap key -> column


class AnalysisError(StellaError):
    """The runs given cannot fill the analysis (none finished, none with what it analyses)."""


def build_analysis(kind: str, paths: list[Path], forgetting: str = "conventional") -> Table:
    if kind not in ANALYSES:
        raise AnalysisError(f"--table {kind!r}: the analyses are {', '.join(ANALYSES)}")
    if forgetting not in FORGETTING:
        raise AnalysisError(f"--forgetting {forgetting!r}: choose conventional or as-coded")
    if kind == "task-order":
        return task_order_table(paths, forgetting)
    if kind == "modality-gap":
        return gap_table(paths)
    return sweep_table(kind, paths, forgetting)


def analysis_figure(table: Table, out: Path) -> Path:
    """OUT/<table>.png: the figure of an analysis table."""
    draw = {"task-order": task_order_figure, "modality-gap": gap_figure}.get(table.name, sweep_figure)
    return draw(table, out / f"{table.name}.png")


# ----------------------------------------------------------------------------------------------------------
# runs


def finished_runs(paths: list[Path], skip: Callable[[Run], str | None]) -> tuple[list[Run], list[str]]:
    """The runs that trained every task (Multitask: its one pass); `skip(run)` says why a run does not belong to
    the analysis (a note), or None."""
    runs, notes = [], []
    for path in paths:
        run = load_run(path)
        summary = run.result("summary.json")
        if summary is None:
            notes.append(f"skipped {path}: no results/summary.json yet")
        elif len(summary["trained"]) != len(summary["tasks"]) and not is_upper_bound(run.method):
            notes.append(f"skipped {path}: {len(summary['trained'])} of {len(summary['tasks'])} tasks trained")
        elif (why := skip(run)) is not None:
            notes.append(f"skipped {path}: {why}")
        else:
            runs.append(run)
    if not runs:
        raise AnalysisError("stella report: no run to analyse among the given paths"
                            + (f" ({'; '.join(notes)})" if notes else ""))
    return runs, notes


def add_af(g: Group, run: Run, forgetting: str) -> None:
    """A and F of R@K avg per direction (results/summary.json) into the row's columns, and their mean over the
    two directions, the figures' one number per run, into g.extra['A'] / ['F'] (None where missing)."""
    summary = run.result("summary.json")
    for name, key in (("A", "A"), ("F", FORGETTING[forgetting])):
        both = [summary[d]["avg"].get(key) for d in DIRECTIONS]
        for d, value in zip(DIRECTIONS, both):
            if value is not None:
                g.values.setdefault(f"{DIRECTION_NAMES[d]} avg {name}", []).append(float(value))
        g.extra.setdefault(name, []).append(None if None in both else (both[0] + both[1]) / 2)


def forgetting_note(forgetting: str) -> str:
    kind = "conventional" if forgetting == "conventional" else "as coded (B15)"
    return f"R@K avg; F = {kind} forgetting; A higher is better, F lower is better"


def mark_best_within(table: Table, bucket: Callable[[Group], Any], columns: list[str]) -> None:
    """report.mark_best inside each bucket of rows (e.g. the methods of one memory size)."""
    for key in dict.fromkeys(bucket(g) for g in table.groups):
        rows = [i for i, g in enumerate(table.groups) if bucket(g) == key]
        sub = Table(table.name, columns, [table.groups[i] for i in rows], table.lower_better)
        mark_best(sub)
        for col, best in sub.best.items():
            table.best.setdefault(col, set()).update(rows[i] for i in best)


def rerun_command(g: Group) -> str:
    """Each run of a row again, from its own saved recipe (its seed and its task order are in it)."""
    if len(g.runs) == 1:
        return f"stella train {g.runs[0].path}/config.yaml --set output.dir={g.runs[0].path}_rerun"
    return (f"for run in {' '.join(str(r.path) for r in g.runs)}; do stella train $run/config.yaml "
            f"--set output.dir=${{run}}_rerun; done")


def mean_sd(values: list[float | None]) -> tuple[float, float] | None:
    """(mean, sample std; 0 for one value) of the values present, for error bars; None for none."""
    stat = mean_std([v for v in values if v is not None])
    return None if stat is None else (stat[0], stat[1] or 0.0)


def color(i: int) -> Any:
    """Row i's colour: tab10, then colours tab10 lacks (the paper's 11 methods need 11)."""
    return plt.get_cmap("tab10")(i) if i < 10 else ("black", "darkgoldenrod", "dimgray")[(i - 10) % 3]


def legend_right(ax) -> None:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


# ----------------------------------------------------------------------------------------------------------
# memory and temperature: one recipe key swept


def swept_value(run: Run, kind: str) -> Any:
    return flatten(run.config).get(SWEPT[kind])


def series_key(run: Run, kind: str) -> str:
    """The recipe without the swept key (and the seed): the runs of one line of the figure."""
    flat = json.loads(recipe_key(run))
    flat.pop(SWEPT[kind], None)
    return json.dumps(flat, sort_keys=True)


def memory_mib(run: Run) -> float | None:
    """method.memory_size x the bytes of one stored clip (the last accuracy-matrix row's `memory`), in MiB."""
    rows = (run.result("retrieval.json") or {}).get("rows") or [{}]
    memory = rows[-1].get("memory")
    return None if memory is None else memory["slots"] * memory["bytes_per_clip"] / 2 ** 20


def sweep_table(kind: str, paths: list[Path], forgetting: str) -> Table:
    """Rows = (method, swept value), in paper order, then by value; A and F per direction (memory: + MiB)."""

    def skip(run: Run) -> str | None:
        if kind == "memory" and run.method not in REPLAY_METHODS:
            return f"method {run.method!r} keeps no replay memory"
        if kind == "temperature" and run.method not in ("stella", "stella+"):
            return f"method {run.method!r} has no AVM temperature"
        return None if swept_value(run, kind) is not None else f"no {SWEPT[kind]} in its config.yaml"

    runs, notes = finished_runs(paths, skip)
    groups = group_runs(runs)
    lines = list(dict.fromkeys(series_key(g.runs[0], kind) for g in groups))
    for g in groups:
        value = swept_value(g.runs[0], kind)
        g.label = f"{display_name(g.method)} ({SWEPT_SHORT[kind]} = {value})"
        g.extra.update(series=lines.index(series_key(g.runs[0], kind)), value=float(value), command=rerun_command(g))
        for run in g.runs:
            add_af(g, run, forgetting)
        if kind == "memory" and (mib := memory_mib(g.runs[0])) is not None:
            g.values[MIB] = [mib]  # the same for every seed: one value
    groups.sort(key=lambda g: (*method_rank(g.method), g.extra["series"], g.extra["value"]))
    plain = [g.label for g in groups]
    _disambiguate(groups)  # rows alike but for other keys get them in their label; so does their line
    for g, label in zip(groups, plain):
        g.extra["line"] = display_name(g.method) + g.label[len(label):]
    columns = ([MIB] if kind == "memory" else []) + AF_COLUMNS
    table = Table(kind, columns, groups, {c: c.endswith(" F") for c in columns}, notes=notes)
    if kind == "memory":
        mark_best_within(table, lambda g: g.extra["value"], AF_COLUMNS)
        table.notes.append("best per column among the methods of one memory size M (clips, over all ranks); MiB = "
                           "M x the bytes one stored clip takes in the run's buffer (README 'Analyses')")
    else:
        mark_best_within(table, lambda g: g.extra["series"], AF_COLUMNS)
        table.notes.append("best per column among the temperatures τ of one method")
    table.notes.append(forgetting_note(forgetting) + "; mean ± sample std over seeds")
    return table


def sweep_figure(table: Table, out: Path) -> Path:
    """A and F against the swept value, a line per method: memory as 2 x 2 panels (A top, F bottom; against the
    clips left, against their MiB right), temperature as 1 x 2 (A, F)."""
    memory = table.name == "memory"
    metrics = (("A", "average accuracy A (higher is better)"), ("F", "forgetting F (lower is better)"))
    if memory:
        panels = [[(name, x) for x in ("value", MIB)] for name, _ in metrics]
    else:
        panels = [[(name, "value") for name, _ in metrics]]
    x_labels = {"value": "memory M, clips" if memory else "AVM attention temperature τ",
                MIB: "memory, MiB of stored clips"}
    with plt.rc_context(STYLE):
        rows, cols = len(panels), len(panels[0])
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 1.8, 3.3 * rows), squeeze=False,
                                 constrained_layout=True)
        for r, c in np.ndindex(rows, cols):
            name, x_key = panels[r][c]
            ax = axes[r][c]
            ticks = set()
            for s in dict.fromkeys(g.extra["series"] for g in table.groups):
                points = []
                for g in (g for g in table.groups if g.extra["series"] == s):
                    x = g.extra["value"] if x_key == "value" else (g.values.get(MIB) or [None])[0]
                    if x is not None and (y := mean_sd(g.extra[name])) is not None:
                        points.append((x, *y))
                if points:
                    x, y, e = zip(*points)
                    line = next(g.extra["line"] for g in table.groups if g.extra["series"] == s)
                    ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, lw=1.6, color=color(s), label=line)
                    ticks.update(x)
            ax.set_xscale("log")
            if x_key == "value":  # the swept values themselves as ticks
                ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
                ax.xaxis.set_minor_locator(plt.NullLocator())
            else:  # 1, 2, 5 x 10^k: labelled ticks whatever the range
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.grid(True)
            ax.set_xlabel(f"{x_labels[x_key]} (log scale)")
            ax.set_ylabel(dict(metrics)[name] + "\nR@K avg (%)")
        legend_right(axes[0][-1])
        n = sorted({len(g.runs) for g in table.groups})
        fig.suptitle(f"{table.name}: mean of A→V and V→A; mean over seeds (n = {', '.join(map(str, n))}), "
                     "error bars = sample std")
        return _save(fig, out)


# ----------------------------------------------------------------------------------------------------------
# task order


def task_order(run: Run) -> tuple[str, ...]:
    """The order the run learnt its tasks in (results/summary.json: the recipe's data.tasks, or the data's)."""
    return tuple(run.result("summary.json")["tasks"])


def rank_average(scores: dict[int, float]) -> dict[int, float]:
    """1 = highest score; tied scores share the mean of their ranks (1, 2.5, 2.5, 4)."""
    ordered = sorted(scores, key=lambda i: -scores[i])
    ranks: dict[int, float] = {}
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and round(scores[ordered[j + 1]], 9) == round(scores[ordered[i]], 9):
            j += 1
        for k in ordered[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def task_order_table(paths: list[Path], forgetting: str) -> Table:
    """Rows = methods (data.tasks ignored in grouping); A and F over every order and seed; rank per order by the
    mean of A->V and V->A A (R@K avg), seeds of one order averaged first; Multitask has no order."""
    runs, notes = finished_runs(paths, lambda run: "Multitask learns every task at once: it has no task order"
                                if is_upper_bound(run.method) else None)
    orders = list(dict.fromkeys(task_order(run) for run in runs))
    ignore_order = [Run(run.path, {**run.config, "data": {k: v for k, v in run.config.get("data", {}).items()
                                                          if k != "tasks"}}) for run in runs]
    groups = group_runs(ignore_order)
    by_path = {run.path: run for run in runs}
    rank_columns = [f"rank order {j + 1}" for j in range(len(orders))]
    per_order: dict[int, dict[int, list[float]]] = {}  # order -> group -> A of each of its runs
    for i, g in enumerate(groups):
        g.runs = [by_path[r.path] for r in g.runs]
        g.extra["command"] = rerun_command(g)
        for run in g.runs:
            add_af(g, run, forgetting)
            if (a := g.extra["A"][-1]) is not None:
                per_order.setdefault(orders.index(task_order(run)), {}).setdefault(i, []).append(a)
        g.extra.update(order_A={}, orders=orders)
    for j, scores in sorted(per_order.items()):
        means = {i: float(np.mean(v)) for i, v in scores.items()}
        for i, rank in rank_average(means).items():
            groups[i].values[rank_columns[j]] = [rank]
            groups[i].values.setdefault("mean rank", []).append(rank)
            groups[i].extra["order_A"][j] = means[i]
    columns = AF_COLUMNS + rank_columns + ["mean rank"]
    table = Table("task-order", columns, groups, {c: c.endswith(" F") or "rank" in c for c in columns}, notes=notes)
    mark_best(table)
    table.notes += [f"order {j + 1}: {' -> '.join(order)}" for j, order in enumerate(orders)]
    table.notes.append(forgetting_note(forgetting) + "; A and F: mean ± sample std over every order and seed; "
                       "rank 1 = the highest mean of A->V and V->A A in that order (ties share their mean rank)")
    return table


def task_order_figure(table: Table, out: Path) -> Path:
    """Left: each method's A in each order (dots) and its mean ± std over orders; right: its rank per order."""
    rank_columns = [c for c in table.columns if c.startswith("rank order ")]
    labels = [g.label for g in table.groups]
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8 + 0.1 * len(labels)), constrained_layout=True)
        for i, g in enumerate(table.groups):
            for j, a in g.extra["order_A"].items():
                left.plot(a, i, "o", color=plt.get_cmap("Dark2")(j % 8), ms=6, alpha=0.9,
                          label=f"order {j + 1}" if i == 0 else None)
            if (stat := mean_sd(list(g.extra["order_A"].values()))) is not None:
                left.errorbar(stat[0], i, xerr=stat[1], fmt="|", color="black", ms=14, capsize=4, lw=1.4,
                              label="mean ± std over orders" if i == 0 else None)
        left.set_yticks(range(len(labels)), labels)
        left.invert_yaxis()
        left.set_xlabel("mean of A→V and V→A average accuracy A, R@K avg (%)")
        left.grid(True, axis="x")
        left.legend(frameon=False, fontsize=7)
        x = np.arange(1, len(rank_columns) + 1)
        for i, g in enumerate(table.groups):
            ranks = [g.values[c][0] if c in g.values else np.nan for c in rank_columns]
            right.plot(x, ranks, marker="o", lw=1.8, color=color(i), label=g.label)
        right.set_xticks(x, [f"order {j}" for j in x])
        right.set_yticks(range(1, len(labels) + 1))
        right.invert_yaxis()
        right.set_ylabel("rank (1 = best A)")
        right.grid(True, axis="y")
        legend_right(right)
        fig.suptitle("task order: each method over several orders of the tasks")
        orders = table.groups[0].extra["orders"]
        fig.text(0.01, -0.01, "\n".join(f"order {j + 1}: {' → '.join(o)}" for j, o in enumerate(orders)), ha="left",
                 va="top", fontsize=8)
        return _save(fig, out)


# ----------------------------------------------------------------------------------------------------------
# modality gap


def gap_rows(run: Run) -> list[dict[str, float]] | None:
    """modality_gap of each accuracy-matrix row (results/retrieval.json), or None where it was not recorded."""
    rows = (run.result("retrieval.json") or {}).get("rows") or []
    gaps = [row.get("modality_gap") for row in rows]
    return None if not gaps or None in gaps else gaps


def gap_table(paths: list[Path]) -> Table:
    """Rows = methods; columns = gap, spread audio, spread video after each task (mean ± std over seeds).
    Multitask's one row (after its pass over every task) is placed after the last task."""
    runs, notes = finished_runs(paths, lambda run: None if gap_rows(run) is not None else
                                "no modality gap in results/retrieval.json (trained before it was recorded: "
                                "`stella eval RUN --task retrieval` adds it)")
    orders = {task_order(run) for run in runs}
    tasks = list(next(iter(orders))) if len(orders) == 1 else \
        [str(k + 1) for k in range(max(len(o) for o in orders))]  # several orders: positions
    groups = group_runs(runs)
    columns = [f"{part} {t}" for part in GAP_PARTS.values() for t in tasks]
    for g in groups:
        g.extra["command"] = rerun_command(g)
        for run in g.runs:
            rows = gap_rows(run)
            offset = len(tasks) - len(rows)  # 0, or Multitask's single row at the end
            for l, gap in enumerate(rows):
                for key, part in GAP_PARTS.items():
                    g.values.setdefault(f"{part} {tasks[offset + l]}", []).append(gap[key])
    table = Table("modality-gap", columns, groups, {c: False for c in columns}, notes=notes)
    table.notes += [
        "gap = |mean normalised audio embedding - mean normalised video embedding| over the retrieval gallery of "
        "every task (Liang et al. 2022); spread = root-mean-square distance of a modality's normalised embeddings "
        "from their centroid (README 'Analyses'); neither is better lower or higher, so nothing is marked",
        "columns: after each task, in the order learnt" + ("" if len(orders) == 1 else
                                                          " (the runs learnt different orders: task positions)"),
        "mean ± sample std over seeds"]
    if any(is_upper_bound(g.method) for g in groups):
        table.notes.append("Multitask: its one evaluation, after its pass over every task, is under the last task")
    return table


def gap_figure(table: Table, out: Path) -> Path:
    """Gap, spread audio and spread video after each task, a line per method (band = seed std)."""
    tasks = [c.removeprefix("gap ") for c in table.columns if c.startswith("gap ")]
    x = np.arange(len(tasks))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
        for ax, (key, part) in zip(axes, GAP_PARTS.items()):
            for i, g in enumerate(table.groups):
                stats = [mean_sd(g.values.get(f"{part} {t}", [])) for t in tasks]
                m = np.array([s[0] if s else np.nan for s in stats])
                e = np.array([s[1] if s else np.nan for s in stats])
                style = dict(color=color(i), label=g.label)
                if np.isfinite(m).sum() == 1:  # Multitask: one point
                    ax.plot(x, m, marker="*", ms=11, ls="none", **style)
                    continue
                ax.plot(x, m, marker="o", ms=3.5, lw=1.8, **style)
                ax.fill_between(x, m - e, m + e, color=color(i), alpha=0.15, lw=0)
            ax.set_xticks(x, tasks, rotation=30, ha="right")
            ax.set_xlabel("after training task")
            ax.set_title({"gap": "modality gap |μ_audio − μ_video|", "spread_a": "spread of the audio embeddings",
                          "spread_v": "spread of the video embeddings"}[key])
            ax.grid(True, axis="y")
        axes[0].set_ylabel("Euclidean distance (unit sphere)")
        legend_right(axes[-1])
        n = sorted({len(g.runs) for g in table.groups})
        fig.suptitle("modality gap over the stream, retrieval gallery of every task (seeds per row: "
                     f"{', '.join(map(str, n))}; band = sample std)")
        return _save(fig, out)
