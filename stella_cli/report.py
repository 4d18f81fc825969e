"""`stella report`: the paper's tables (docs/protocol.md "Tables") over any set of run directories.

A row is one recipe: runs whose resolved recipes (config.yaml) differ only in `train.seed` and `output.dir` are
seeds of one row, shown as mean ± sample standard deviation over the seeds (n = number of seeds; n = 1 shows the
mean alone). Rows follow the paper's method order. Each table is written as markdown, CSV and JSON.

    retrieval   rows = methods; columns = A->V, V->A x R@1/5/10/avg x A (higher is better) and F (lower is
                better), from results/summary.json; best per column marked among the continual methods
                (Multitask is the upper bound, not a competitor)
    ablation    the same columns; rows = STELLA / STELLA+ runs by `method.stella.selection`
    efficiency  rows = methods from `stella bench --json` files (time per iteration, memory, ratios)
    downstream  rows = pre-training recipes; columns = every metric found in results/<task>.json
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from stella_cli.config import SELECTIONS
from stella_cli.console import console, print_rows
from stella_cli.errors import StellaError
from stella_cli.evaluate import DIRECTIONS, mean_std, paired_difference
from stella_cli.factory import METHODS, PAPER_METHODS
from stella_cli.files import atomic_write_text, make_dir
from stella_cli.plots import bench_bars, paired_plot, plot_run, report_bars

DOWNSTREAM_TASKS = ("classification", "ave", "avs", "msrvtt", "localisation")
TABLES = ("retrieval", "efficiency", "downstream", "ablation")
FORGETTING = {"conventional": "F", "as-coded": "F_as_coded"}  # --forgetting -> key in results/summary.json
DIRECTION_NAMES = {"a2v": "A->V", "v2a": "V->A"}
RUN_KEYS_IGNORED = ("train.seed", "output.dir")  # what may differ between the seeds of one row
OURS = ("stella", "stella+")  # the rows compared with every baseline, paired by seed
START_POINTS = {"model.avm.checkpoint": "AVM", "model.checkpoint": "backbone"}  # row labels: "STELLA (random AVM)"


# ----------------------------------------------------------------------------------------------------------
# runs and groups


@dataclass
class Run:
    """One run directory: its resolved recipe (raw YAML, so keys of any branch load) and its results."""

    path: Path
    config: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.config.get("method", {}).get("name", "?"))

    @property
    def seed(self) -> Any:
        return self.config.get("train", {}).get("seed")

    @property
    def selection(self) -> str:
        return str(self.config.get("method", {}).get("stella", {}).get("selection") or "full")

    def result(self, name: str) -> dict[str, Any] | None:
        path = self.path / "results" / name
        return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class Group:
    """The runs of one recipe (seeds), and what the table shows for them."""

    runs: list[Run]
    label: str = ""
    values: dict[str, list[float]] = field(default_factory=dict)  # column -> one value per run that has it
    by_seed: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> {seed: value} (pairing)
    extra: dict[str, Any] = field(default_factory=dict)  # recipe / command override (bench, downstream)

    @property
    def method(self) -> str:
        return self.runs[0].method if self.runs else str(self.extra.get("method", "?"))


def expand_runs(patterns: list[str], dirs: bool = True) -> list[Path]:
    """Paths or globs, in the given order, each once; a pattern matching nothing is an error. A glob keeps only
    run directories (with a config.yaml), or only files (dirs=False: bench JSON), so `runs/*` may hold other
    things; a path named explicitly is kept as given (and refused later if it is not what the table reads)."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [m for m in sorted(glob.glob(pattern))
                       if ((Path(m) / "config.yaml").is_file() if dirs else Path(m).is_file())]
        else:
            matches = [pattern] if Path(pattern).exists() else []
        if not matches:
            raise StellaError(f"{pattern}: no such run directory or file")
        paths += [Path(m) for m in matches if Path(m) not in paths]
    return paths


def load_run(path: Path) -> Run:
    config = path / "config.yaml"
    if not config.is_file():
        raise StellaError(f"{path}: not a run directory (no config.yaml; give `stella train` output dirs)")
    return Run(path, yaml.safe_load(config.read_text()) or {})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_key(run: Run) -> str:
    """The recipe without the keys that may differ between seeds; runs with equal keys form one row."""
    flat = {k: v for k, v in flatten(run.config).items() if k not in RUN_KEYS_IGNORED}
    flat.setdefault("method.stella.selection", "full")
    if flat["method.stella.selection"] is None:
        flat["method.stella.selection"] = "full"
    return json.dumps(flat, sort_keys=True, default=str)


def method_rank(method: str) -> tuple[int, str]:
    """Paper order first, unknown methods after it, alphabetically."""
    return (PAPER_METHODS.index(method), "") if method in PAPER_METHODS else (len(PAPER_METHODS), method)


def is_upper_bound(method: str) -> bool:
    """Multitask sees every task at once: never marked best, and no forgetting (one checkpoint)."""
    return method in PAPER_METHODS and METHODS[method].union


def display_name(method: str) -> str:
    return (METHODS[method].row if method in METHODS else None) or method


def group_runs(runs: list[Run], ablation: bool = False) -> list[Group]:
    """One group per recipe, in paper order (ablation: then by selection variant); labels made unique."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(recipe_key(run), []).append(run)
    groups = [Group(sorted(rs, key=lambda r: (str(r.seed), str(r.path)))) for rs in by_key.values()]

    def order(g: Group) -> tuple:
        sel = g.runs[0].selection
        sel_rank = SELECTIONS.index(sel) if sel in SELECTIONS else len(SELECTIONS)
        return (*method_rank(g.method), sel_rank, sel, str(g.runs[0].path)) if ablation else \
            (*method_rank(g.method), str(g.runs[0].path))

    groups.sort(key=order)
    for g in groups:
        g.label = display_name(g.method) + (f" / {g.runs[0].selection}" if ablation else "")
    _disambiguate(groups)
    return groups


def _disambiguate(groups: list[Group]) -> None:
    """Groups sharing a label get the recipe keys in which they differ, e.g. 'STELLA (method.memory_size=100)'."""
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        flats = [flatten(g.runs[0].config) for g in same]
        keys = sorted({k for f in flats for k in f if k not in RUN_KEYS_IGNORED
                       and len({json.dumps(x.get(k), default=str) for x in flats}) > 1})
        for g, flat in zip(same, flats):
            g.label += " (" + ", ".join(describe(k, flat.get(k)) for k in keys) + ")"


def describe(key: str, value: Any) -> str:
    """A recipe key in a row label: start points by what they are (a path says little), the rest as key=value."""
    if key in START_POINTS:
        return f"{'pre-trained' if value else 'random'} {START_POINTS[key]}"
    return f"{key}={value}"


def seeds_of(g: Group) -> list[str]:
    return [str(r.seed) for r in g.runs]


def recipe_of(g: Group) -> str:
    return g.extra.get("recipe") or str(g.runs[0].path / "config.yaml")


def command_of(g: Group) -> str:
    """The command that reproduces the row's runs from the saved recipe of its first run."""
    if "command" in g.extra:
        return g.extra["command"]
    config = g.runs[0].path / "config.yaml"
    if len(g.runs) == 1:
        return f"stella train {config} --set output.dir={g.runs[0].path}_rerun"
    seeds = " ".join(seeds_of(g))
    stem = re.sub(r"_s\d+$", "", g.runs[0].path.name)  # the first run's name without its seed: one folder per row
    return f"for seed in {seeds}; do stella train {config} --set train.seed=$seed " \
           f"--set output.dir={g.runs[0].path.parent}/{stem}_rerun_s$seed; done"


# ----------------------------------------------------------------------------------------------------------
# tables


@dataclass
class Paired:
    """`row` - `against` in `column`, paired by seed: mean difference and its t-interval [low, high] over n seeds.
    A: > 0 = `row` higher; F: < 0 = `row` forgets less. `best`: `against` is the column's best baseline."""

    row: str
    against: str
    column: str
    mean: float
    low: float
    high: float
    n: int
    seeds: list[str] = field(default_factory=list)
    best: bool = False

    @property
    def resolved(self) -> bool:
        """The interval excludes 0: the sign of the difference is resolved at the interval's level."""
        return self.low > 0 or self.high < 0

    def cell(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


@dataclass
class Table:
    """Rows of groups x columns of mean ± std; `best[col]` = row indices marked best; `lower_better[col]`."""

    name: str
    columns: list[str]
    groups: list[Group]
    lower_better: dict[str, bool]
    notes: list[str] = field(default_factory=list)
    best: dict[str, set[int]] = field(default_factory=dict)
    run_dirs: list[Path] = field(default_factory=list)  # every run directory read, in the table or not (figures)
    paired: list[Paired] = field(default_factory=list)  # retrieval: STELLA / STELLA+ against each baseline

    def stat(self, row: int, col: str) -> tuple[float, float | None, int] | None:
        return mean_std(self.groups[row].values.get(col, []))


def mark_best(table: Table) -> None:
    """Best mean per column (max, or min where lower is better) among non-upper-bound rows; ties all marked.
    Nothing is marked in a column with fewer than two candidates."""
    for col in table.columns:
        cand = {i: s[0] for i, g in enumerate(table.groups)
                if not is_upper_bound(g.method) and (s := table.stat(i, col)) is not None}
        if len(cand) < 2:
            continue
        target = (min if table.lower_better[col] else max)(cand.values())
        table.best[col] = {i for i, v in cand.items() if round(v, 6) == round(target, 6)}


def retrieval_columns(ks: list[str]) -> list[str]:
    return [f"{DIRECTION_NAMES[d]} {k} {s}" for d in DIRECTIONS for k in ks for s in ("A", "F")]


def retrieval_table(runs: list[Run], forgetting: str = "conventional", ablation: bool = False) -> Table:
    """results/summary.json of every finished run, grouped by recipe; F from --forgetting."""
    f_key = FORGETTING[forgetting]
    notes, finished = [], []
    for run in runs:
        summary = run.result("summary.json")
        if summary is None:
            notes.append(f"skipped {run.path}: no results/summary.json yet")
            continue
        complete = len(summary["trained"]) == len(summary["tasks"]) or is_upper_bound(run.method)
        if not complete:
            notes.append(f"skipped {run.path}: {len(summary['trained'])} of {len(summary['tasks'])} tasks trained")
            continue
        if ablation and run.method not in ("stella", "stella+"):
            notes.append(f"skipped {run.path}: method {run.method!r} has no selection variants")
            continue
        finished.append((run, summary))
    if not finished:
        raise StellaError("stella report: no finished run among the given paths" +
                          (f" ({'; '.join(notes)})" if notes else ""))
    ks = [k for k in finished[0][1][DIRECTIONS[0]]]  # R@1, R@5, R@10, avg (whatever eval.recall_at gave)
    groups = group_runs([r for r, _ in finished], ablation=ablation)
    summaries = {r.path: s for r, s in finished}
    columns = retrieval_columns(ks)
    for g in groups:
        for run in g.runs:
            s = summaries[run.path]
            for d in DIRECTIONS:
                for k in ks:
                    for name, key in (("A", "A"), ("F", f_key)):
                        value = s.get(d, {}).get(k, {}).get(key)
                        if value is not None:
                            col = f"{DIRECTION_NAMES[d]} {k} {name}"
                            g.values.setdefault(col, []).append(float(value))
                            g.by_seed.setdefault(col, {})[str(run.seed)] = float(value)
    table = Table("ablation" if ablation else "retrieval", columns, groups,
                  {c: c.endswith(" F") for c in columns}, notes=notes)
    f_name = "conventional forgetting" if forgetting == "conventional" else "forgetting as the authors coded it (B15)"
    table.notes.append(f"F = {f_name}; A higher is better, F lower is better; mean ± sample std over seeds")
    mark_best(table)
    if not ablation:
        table.paired = paired_differences(table)
    return table


def paired_differences(table: Table, level: float = 0.95) -> list[Paired]:
    """STELLA and STELLA+ rows against every baseline row (not Multitask) in the avg columns: the difference of
    the seeds both rows ran, its mean and t-interval over those seeds (evaluate.paired_difference)."""
    ours = [g for g in table.groups if g.method in OURS]
    baselines = [g for g in table.groups if g.method not in OURS and not is_upper_bound(g.method)]
    out = []
    for col in [c for c in table.columns if " avg " in c]:
        means = {g.label: s[0] for g in baselines if (s := mean_std(g.values.get(col, []))) is not None}
        best = (min if table.lower_better[col] else max)(means, key=means.get) if means else None
        for g in ours:
            for b in baselines:
                mine, theirs = g.by_seed.get(col, {}), b.by_seed.get(col, {})
                seeds = sorted(set(mine) & set(theirs), key=lambda s: (len(s), s))
                diff = paired_difference([mine[s] for s in seeds], [theirs[s] for s in seeds], level)
                if diff is not None:
                    out.append(Paired(g.label, b.label, col, *diff, seeds=seeds, best=b.label == best))
    return out


BENCH_COLUMNS = {  # column -> (bench key, scale, lower is better)
    "iter (s)": ("iter_s", 1.0, True), "activation (MiB)": ("activation_bytes", 2.0 ** -20, True),
    "peak (MiB)": ("peak_bytes", 2.0 ** -20, True), "iter ratio": ("iter_ratio", 1.0, True),
    "activation ratio": ("activation_ratio", 1.0, True), "peak ratio": ("peak_ratio", 1.0, True),
}
BENCH_SETTING = ("preset", "batch", "attention", "device")


def efficiency_table(files: list[Path]) -> Table:
    """Rows of `stella bench --json` files, grouped by (method, preset, batch, attention, device)."""
    by_key: dict[tuple, Group] = {}
    for path in files:
        if path.is_dir():
            raise StellaError(f"{path}: --table efficiency reads `stella bench --json` files, not run directories")
        try:
            rows = json.loads(path.read_text())
        except UnicodeDecodeError:  # e.g. a checkpoint given by mistake: never unpickled here
            raise StellaError(f"{path}: a binary file, not JSON; --table efficiency reads `stella bench --json` "
                              "files") from None
        except json.JSONDecodeError as err:
            raise StellaError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r for r in rows):
            raise StellaError(f"{path}: expected a `stella bench --json` list of rows with a 'method' key")
        for row in rows:
            setting = tuple(row.get(k) for k in BENCH_SETTING)
            key = (row["method"], *setting)
            if key not in by_key:
                desc = ", ".join(f"{k} {v}" for k, v in zip(BENCH_SETTING, setting) if v is not None)
                by_key[key] = Group([], extra={"method": row["method"], "recipe": desc,
                                               "command": row.get("command") or f"stella bench --json {path}",
                                               "setting": setting})
            g = by_key[key]
            for col, (src, scale, _) in BENCH_COLUMNS.items():
                if row.get(src) is not None:
                    g.values.setdefault(col, []).append(float(row[src]) * scale)
    groups = sorted(by_key.values(), key=lambda g: (json.dumps(g.extra["setting"], default=str),
                                                    *method_rank(g.method)))
    settings = {g.extra["setting"] for g in groups}
    for g in groups:
        g.label = display_name(g.method) + (f" ({g.extra['recipe']})" if len(settings) > 1 else "")
    table = Table("efficiency", list(BENCH_COLUMNS), groups, {c: v[2] for c, v in BENCH_COLUMNS.items()},
                  notes=["ratios are relative to the benchmark's reference row; lower is better everywhere"])
    if len(settings) == 1:
        table.notes.append("setting: " + groups[0].extra["recipe"])
    mark_best(table)
    return table


def lower_is_better(metric: str) -> bool:
    """Downstream metrics are scores unless their name says loss, error or rank."""
    name = metric.lower()
    return any(word in name for word in ("loss", "err", "medr", "rank"))


def downstream_table(runs: list[Run]) -> Table:
    """results/<task>.json of every run (task in DOWNSTREAM_TASKS), every numeric metric a column."""
    columns: list[str] = []
    found = []
    for run in runs:
        results = {t: r for t in DOWNSTREAM_TASKS if (r := run.result(f"{t}.json")) is not None}
        if results:
            found.append((run, results))
    if not found:
        raise StellaError("stella report --table downstream: no results/<task>.json "
                          f"({', '.join(DOWNSTREAM_TASKS)}) in the given runs (run `stella eval` first)")
    for task in DOWNSTREAM_TASKS:
        for _, results in found:
            for metric, value in results.get(task, {}).get("metrics", {}).items():
                col = f"{task} {metric}"
                if isinstance(value, (int, float)) and col not in columns:
                    columns.append(col)
    groups = group_runs([r for r, _ in found])
    by_path = {r.path: res for r, res in found}
    for g in groups:
        commands: list[str] = []
        for run in g.runs:
            for task, result in by_path[run.path].items():
                for metric, value in result.get("metrics", {}).items():
                    if isinstance(value, (int, float)):
                        g.values.setdefault(f"{task} {metric}", []).append(float(value))
                if result.get("command") and result["command"] not in commands:
                    commands.append(result["command"])
        g.extra["command"] = "; ".join(commands) or command_of(g)
    table = Table("downstream", columns, groups, {c: lower_is_better(c) for c in columns},
                  notes=["metrics from results/<task>.json of each run; mean ± sample std over seeds"])
    mark_best(table)
    return table


def build_table(kind: str, paths: list[Path], forgetting: str = "conventional") -> Table:
    if kind not in TABLES:
        raise StellaError(f"--table {kind!r}: choose one of {', '.join(TABLES)}")
    if forgetting not in FORGETTING:
        raise StellaError(f"--forgetting {forgetting!r}: choose conventional or as-coded")
    if kind == "efficiency":
        return efficiency_table(paths)
    runs = [load_run(p) for p in paths]
    table = downstream_table(runs) if kind == "downstream" else \
        retrieval_table(runs, forgetting, ablation=kind == "ablation")
    table.run_dirs = [r.path for r in runs]
    return table


# ----------------------------------------------------------------------------------------------------------
# output


def format_stat(stat: tuple[float, float | None, int] | None, digits: int = 2) -> str:
    if stat is None:
        return "-"
    mean, std, _ = stat
    text = f"{mean:.{digits}f}".replace("-0.00", "0.00")
    return text if std is None else f"{text} ± {std:.{digits}f}"


def row_count(g: Group) -> int:
    """n of a row: its runs (seeds), or for benchmark rows the most values of any column."""
    return len(g.runs) or max((len(v) for v in g.values.values()), default=0)


def table_rows(table: Table, bold: tuple[str, str] = ("**", "**")) -> list[list[str]]:
    """Header + one row per group: row label, n, then the formatted cells (best wrapped in `bold`)."""
    rows = [["method", "n", *table.columns]]
    for i, g in enumerate(table.groups):
        cells = []
        for col in table.columns:
            text = format_stat(table.stat(i, col))
            cells.append(f"{bold[0]}{text}{bold[1]}" if i in table.best.get(col, ()) else text)
        rows.append([g.label, str(row_count(g)), *cells])
    return rows


def to_markdown(table: Table) -> str:
    rows = table_rows(table)
    lines = [f"## {table.name}", "", "| " + " | ".join(rows[0]) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if table.best:
        lines += ["", "**bold** = best per column" + (" (Multitask excluded)" if table.name in ("retrieval", "ablation")
                                                        else "")]
    lines.append("")
    lines += [f"- {n}" for n in table.notes]
    if table.paired:
        lines += ["", "### paired differences over seeds", "", PAIRED_NOTE, ""]
        lines += markdown_rows(paired_best_rows(table)) + [""] + markdown_rows(paired_matrix_rows(table))
    lines += ["", "| row | seeds | runs | recipe | command |", "|---|---|---|---|---|"]
    for g in table.groups:
        lines.append(f"| {g.label} | {', '.join(seeds_of(g)) or '-'} | {', '.join(str(r.path) for r in g.runs) or '-'}"
                     f" | `{recipe_of(g)}` | `{command_of(g)}` |")
    return "\n".join(lines) + "\n"


PAIRED_NOTE = ("row - baseline, paired by seed: mean difference [95% t-interval over the seeds both ran]; A: > 0 = "
               "the row is higher, F: < 0 = the row forgets less; 'resolved' = the interval excludes 0")


def paired_best_rows(table: Table) -> list[list[str]]:
    """Header + one row per (STELLA row, column): the difference to the column's best baseline."""
    rows = [["row", "column", "best baseline", "difference [95% interval]", "n", "resolved"]]
    for p in (p for p in table.paired if p.best):
        rows.append([p.row, p.column, p.against, p.cell(), str(p.n), "yes" if p.resolved else "no"])
    return rows


def paired_matrix_rows(table: Table) -> list[list[str]]:
    """Header + one row per (STELLA row, baseline): the difference in every avg column."""
    columns = list(dict.fromkeys(p.column for p in table.paired))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for p in table.paired:
        cells.setdefault((p.row, p.against), {})[p.column] = p.cell()
    return [["row - baseline", *columns]] + [[f"{row} - {against}", *(c.get(col, "-") for col in columns)]
                                              for (row, against), c in cells.items()]


def markdown_rows(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] * len(rows[0])) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows[1:]]


def to_csv(table: Table) -> str:
    """Numbers, not strings: per column the mean and the std; then best columns, seeds, recipe, command."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(["row", "method", "n", *[h for c in table.columns for h in (c, f"{c} std")],
                     "best", "seeds", "runs", "recipe", "command"])
    for i, g in enumerate(table.groups):
        cells = []
        for col in table.columns:
            s = table.stat(i, col)
            cells += ["" if s is None else f"{s[0]:.6g}", "" if s is None or s[1] is None else f"{s[1]:.6g}"]
        best = ";".join(c for c in table.columns if i in table.best.get(c, ()))
        writer.writerow([g.label, g.method, row_count(g), *cells, best, " ".join(seeds_of(g)),
                         " ".join(str(r.path) for r in g.runs), recipe_of(g), command_of(g)])
    return out.getvalue()


def to_json(table: Table) -> dict[str, Any]:
    rows = []
    for i, g in enumerate(table.groups):
        values = {}
        for col in table.columns:
            s = table.stat(i, col)
            values[col] = None if s is None else {"mean": s[0], "std": s[1], "n": s[2], "values": g.values[col]}
        rows.append({"row": g.label, "method": g.method, "seeds": seeds_of(g), "runs": [str(r.path) for r in g.runs],
                     "recipe": recipe_of(g), "command": command_of(g), "values": values,
                     "best": [c for c in table.columns if i in table.best.get(c, ())]})
    return {"table": table.name, "columns": table.columns,
            "lower_is_better": [c for c in table.columns if table.lower_better[c]], "notes": table.notes, "rows": rows,
            "paired": [{**dataclasses.asdict(p), "resolved": p.resolved} for p in table.paired]}


def write_table(table: Table, out: Path) -> list[Path]:
    """OUT/<table>.md, .csv, .json (each written atomically). OUT may be a link to a folder not made yet (the Docker
    image's reports -> /runs/reports): the folder is made where it points."""
    make_dir(out.resolve())
    paths = [out / f"{table.name}.{ext}" for ext in ("md", "csv", "json")]
    atomic_write_text(paths[0], to_markdown(table))
    atomic_write_text(paths[1], to_csv(table))
    atomic_write_text(paths[2], json.dumps(to_json(table), indent=1))
    if table.paired:
        paths.append(out / f"{table.name}_paired.csv")
        atomic_write_text(paths[-1], paired_csv(table))
    return paths


def paired_csv(table: Table) -> str:
    """One line per comparison: numbers, not strings."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(["row", "against", "column", "mean", "low", "high", "n", "seeds", "best_baseline", "resolved"])
    for p in table.paired:
        writer.writerow([p.row, p.against, p.column, f"{p.mean:.6g}", f"{p.low:.6g}", f"{p.high:.6g}", p.n,
                         " ".join(p.seeds), int(p.best), int(p.resolved)])
    return out.getvalue()


def column_parts(columns: list[str]) -> list[tuple[str, list[str]]]:
    """Retrieval columns split by direction ('A->V ...', 'V->A ...'); others in chunks of 6 (terminal width)."""
    prefixes = list(dict.fromkeys(c.split(" ")[0] for c in columns))
    if all(p in DIRECTION_NAMES.values() for p in prefixes):
        return [(p, [c for c in columns if c.startswith(p + " ")]) for p in prefixes]
    return [("", columns[i:i + 6]) for i in range(0, len(columns), 6)]


def print_table(table: Table) -> None:
    """rich tables, one per direction (retrieval, ablation) or per 6 columns; best cells in green."""
    rows = table_rows(table, bold=("[bold green]", "[/bold green]"))
    header = rows[0][2:]
    for part, columns in column_parts(header):
        index = [0, 1, *[2 + header.index(c) for c in columns]]
        shown = [["method", "n", *[c.removeprefix(part + " ") if part else c for c in columns]]]
        shown += [[row[i] for i in index] for row in rows[1:]]
        print_rows(f"{table.name}{': ' + part if part else ''} (green = best per column)", shown)
    for note in table.notes:
        console.print(f"[dim]{escape(note)}")
    if table.paired:
        print_rows("paired differences to the best baseline (95% t-interval over seeds)",
                   [[escape(c) for c in r] for r in paired_best_rows(table)], left=3)
        console.print(f"[dim]{escape(PAIRED_NOTE)}; against every baseline: {table.name}.md")


def write_figures(table: Table, out: Path) -> list[Path]:
    """The table's bars (plots.py: retrieval, ablation, efficiency), and for every run directory read, finished or
    not, its heatmap and stream plot (once it has retrieval results) and its loss curves."""
    if table.name == "efficiency":
        return [bench_bars(table, out / "efficiency_bars.png")]
    bars = report_bars(table, out / f"{table.name}_bars.png") if table.name in ("retrieval", "ablation") else None
    written = [bars] if bars else []
    if table.paired:
        written.append(paired_plot(table.paired, out / f"{table.name}_paired.png"))
    seen: dict[str, int] = {}
    for path in table.run_dirs:
        seen[path.name] = seen.get(path.name, 0) + 1
        count = seen[path.name]
        prefix = path.name + (f"_{count}" if count > 1 else "") + "_"  # two runs/<name> in other folders
        written += plot_run(path, out / "runs", prefix=prefix)
    return written
