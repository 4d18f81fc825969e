"""`stella reproduce`: every run a paper table needs (methods x seeds), resumable, then its report.

A table is a list of recipes (`recipes/<prefix>_<method>.yaml`) run once per seed. Each run goes through the real
`stella train` in a child process, so a reproduction behaves exactly like the commands README shows, and an
interrupted reproduction is continued by running the same command again:

- a run whose `reproduce.json` marker exists is finished and skipped;
- a run with `checkpoints/latest.pt` is continued with `--resume`;
- any other run starts.

Run directories: `{runs}/{table}/{recipe stem}_s{seed}`. After the runs, `stella report` writes the table into
`{runs}/{table}/report/` and prints it; this module then prints each run's wall time.

The analyses (README "Analyses") run each recipe in several variants, `{recipe stem}_{variant}_s{seed}`: a recipe
key at several values (memory size, AVM temperature), or the tasks in several orders (data.tasks: the recipe's own
order, then seeded permutations). The modality gap needs no runs of its own: it is read from the runs of the
retrieval table at the same scale (every run records it), which it runs or continues in that table's folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from stella_cli.cache import atomic_write_text, read_meta
from stella_cli.config import SELECTIONS, load_recipe
from stella_cli.console import console, print_rows
from stella_cli.errors import Interrupted, StellaError
from stella_cli.factory import METHODS, PAPER_METHODS, REPLAY_METHODS, check_method, recipe_suffix
from stella_cli.synth import SynthConfig

PAPER_RECIPES = tuple(recipe_suffix(m) for m in PAPER_METHODS)  # recipe suffixes in the paper's row order
CONTINUAL_RECIPES = tuple(recipe_suffix(m) for m in PAPER_METHODS if not METHODS[m].union)  # all but Multitask
REPLAY_RECIPES = tuple(recipe_suffix(m) for m in REPLAY_METHODS)  # STELLA, STELLA+ and the replay baselines
MARKER = "reproduce.json"

# Memory sizes (README "Analyses"). The paper's sweep values are not published (the authors' plotting script
# lists none), so the sweep spans 1/4 to 2 x the paper's memory; the synthetic stream gets the same fractions of
# its stream as VGGSound's (the protocol's cap: 8 tasks x 20 classes x 400 clips).
VGGSOUND_MEMORY = (500, 1000, 2000, 4000)
AUDIOSET_MEMORY = (1250, 2500, 5000, 10000)
VGGSOUND_STREAM = 8 * 20 * 400
SYNTHETIC_STREAM = SynthConfig().num_classes * SynthConfig().train_per_class  # 640 training clips, 5 tasks
SYNTHETIC_MEMORY = tuple(round(m * SYNTHETIC_STREAM / VGGSOUND_STREAM) for m in VGGSOUND_MEMORY)  # 5, 10, 20, 40
TEMPERATURES = (0.05, 0.1, 0.2, 0.4, 0.8)  # the paper's 0.4 (VGGSound) and 0.1 (AudioSet), and around them
ORDER_SEED = 2021  # the task orders of the task-order tables: random.Random(ORDER_SEED + j) for order j + 1


@dataclass(frozen=True)
class TableSpec:
    """What a table runs: recipes `recipes/{prefix}_{name}.yaml` for each name, the report layout, defaults."""

    prefix: str
    names: tuple[str, ...]
    report: str  # stella report --table
    seeds: tuple[int, ...] = (2021,)
    full_seeds: tuple[int, ...] = (2021, 2022, 2023)
    epochs_fraction: float = 1.0  # the default (laptop) budget trains this fraction of each recipe's train.epochs
    synthetic: bool = False  # prepare the synthetic benchmark when it is missing
    bench: bool = False  # the efficiency table: `stella bench` instead of training runs
    downstream: bool = False  # `stella eval --task all` on every finished run
    sweep: str = ""  # analyses: each recipe at every one of `values` of this key
    values: tuple[float, ...] = ()
    orders: int = 0  # analyses: each recipe in this many orders of its tasks
    default_names: tuple[str, ...] = ()  # the default (laptop) budget runs these of `names` (--methods: any)
    runs_of: str = ""  # run (and reuse) the runs of this table, in its folder


TABLES: dict[str, TableSpec] = {
    # The laptop default: every method of the paper on the synthetic stream, one seed at a reduced budget
    # (README "Reproducing the tables" states what it runs and what it shows); --full: 3 seeds, recipe budget.
    # Half of each recipe's epochs: 10 per task, and 20 over the union for Multitask (synthetic_multitask.yaml).
    "synthetic": TableSpec("synthetic", PAPER_RECIPES, "retrieval", synthetic=True, epochs_fraction=0.5),
    "synthetic-ablation": TableSpec("synthetic_ablation", SELECTIONS, "ablation", synthetic=True,
                                    epochs_fraction=0.5),
    "vggsound-retrieval": TableSpec("vggsound", PAPER_RECIPES, "retrieval", seeds=(2021, 2022, 2023)),
    "audioset-retrieval": TableSpec("audioset", PAPER_RECIPES, "retrieval", seeds=(2021, 2022, 2023)),
    "ablation": TableSpec("vggsound_ablation", SELECTIONS, "ablation", seeds=(2021, 2022, 2023)),
    "downstream": TableSpec("vggsound", PAPER_RECIPES, "downstream", downstream=True),
    "efficiency": TableSpec("", PAPER_RECIPES, "efficiency", bench=True),
    # the analyses (README "Analyses"): synthetic at the synthetic table's budget and start, a few methods by
    # default (--methods: any of `names`; --full: all, 3 seeds); the paper's scale with its recipes, one seed
    "synthetic-memory": TableSpec("synthetic", REPLAY_RECIPES, "memory", synthetic=True, epochs_fraction=0.5,
                                  sweep="method.memory_size", values=SYNTHETIC_MEMORY,
                                  default_names=("er", "derpp", "stella", "stella_plus")),
    "vggsound-memory": TableSpec("vggsound", REPLAY_RECIPES, "memory", sweep="method.memory_size",
                                 values=VGGSOUND_MEMORY),
    "audioset-memory": TableSpec("audioset", REPLAY_RECIPES, "memory", sweep="method.memory_size",
                                 values=AUDIOSET_MEMORY),
    "synthetic-task-order": TableSpec("synthetic", CONTINUAL_RECIPES, "task-order", synthetic=True,
                                      epochs_fraction=0.5, orders=3,
                                      default_names=("finetune", "er", "derpp", "stella", "stella_plus")),
    "vggsound-task-order": TableSpec("vggsound", CONTINUAL_RECIPES, "task-order", orders=3),
    "audioset-task-order": TableSpec("audioset", CONTINUAL_RECIPES, "task-order", orders=3),
    "synthetic-modality-gap": TableSpec("synthetic", PAPER_RECIPES, "modality-gap", synthetic=True,
                                        epochs_fraction=0.5, runs_of="synthetic",
                                        default_names=("multitask", "finetune", "er", "derpp", "stella",
                                                       "stella_plus")),
    "vggsound-modality-gap": TableSpec("vggsound", PAPER_RECIPES, "modality-gap", seeds=(2021, 2022, 2023),
                                       runs_of="vggsound-retrieval"),
    "audioset-modality-gap": TableSpec("audioset", PAPER_RECIPES, "modality-gap", seeds=(2021, 2022, 2023),
                                       runs_of="audioset-retrieval"),
    "synthetic-temperature": TableSpec("synthetic", ("stella", "stella_plus"), "temperature", synthetic=True,
                                       epochs_fraction=0.5, sweep="method.stella.att_temperature",
                                       values=(0.1, 0.2, 0.4, 0.8, 1.6), default_names=("stella",)),
    "vggsound-temperature": TableSpec("vggsound", ("stella", "stella_plus"), "temperature",
                                      sweep="method.stella.att_temperature", values=TEMPERATURES,
                                      default_names=("stella",)),
    "audioset-temperature": TableSpec("audioset", ("stella", "stella_plus"), "temperature",
                                      sweep="method.stella.att_temperature", values=TEMPERATURES,
                                      default_names=("stella",)),
}


class RunFailed(StellaError):
    """A run of the table failed; its own error line is already on screen. Exits with the run's code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunOutcome:
    recipe: Path
    seed: int
    run_dir: Path
    status: str  # finished | skipped (finished before) | resumed | failed
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def select_names(spec: TableSpec, methods: str | None, full: bool = False) -> tuple[str, ...]:
    """`--methods er,stella` keeps those (in the table's order); unknown names are one-line errors. Without it,
    the table's default methods (--full: all)."""
    if not methods:
        return spec.default_names if spec.default_names and not full else spec.names
    wanted = [recipe_suffix(m.strip()) for m in methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in spec.names]
    if unknown:
        raise ValueError(f"--methods: {', '.join(unknown)} not in this table; choose from {', '.join(spec.names)}")
    return tuple(n for n in spec.names if n in wanted)


def parse_seeds(text: str | None, spec: TableSpec, full: bool) -> tuple[int, ...]:
    if not text:
        return spec.full_seeds if full else spec.seeds
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 2021,2022,2023") from None
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    return seeds


def reproduce(table: str = "synthetic", *, seeds: str | None = None, methods: str | None = None,
              overrides: list[str] | None = None, full: bool = False, runs: Path = Path("runs"),
              recipes: Path = Path("recipes"), values: str | None = None,
              orders: int | None = None) -> list[RunOutcome]:
    """Run (or continue) every run of `table`, then report it. Returns one outcome per run."""
    if table not in TABLES:
        raise ValueError(f"stella reproduce: unknown table {table!r}; choose one of {', '.join(TABLES)}")
    spec = TABLES[table]
    names = select_names(spec, methods, full)
    out_dir = runs / table
    if spec.bench:
        return [run_bench(names, out_dir)]
    seed_list = parse_seeds(seeds, spec, full)
    sets = list(overrides or [])
    recipe_paths = [recipes / f"{spec.prefix}_{name}.yaml" for name in names]
    missing = [str(p) for p in recipe_paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: recipe not found (table {table!r} needs {len(recipe_paths)} "
                                f"recipes under {recipes})")
    swept, n_orders = check_variants(spec, values, orders, sets, recipe_paths)
    if spec.synthetic:
        ensure_synthetic(recipe_paths[0], sets)
    budget = {r: [] if full else scaled_epochs(r, spec.epochs_fraction) for r in recipe_paths}
    run_root = runs / (spec.runs_of or table)
    plan = [(recipe, seed, run_root / "_".join(filter(None, (recipe.stem, tag, f"s{seed}"))),
             [*budget[recipe], *variant_sets, *sets])  # the user's --set come last: they win
            for recipe in recipe_paths for tag, variant_sets in variants(spec, recipe, swept, n_orders, sets)
            for seed in seed_list]
    outcomes = []
    for i, (recipe, seed, run_dir, run_sets) in enumerate(plan, start=1):
        console.rule(f"[{i}/{len(plan)}] {run_dir.name}")
        outcome = train_once(recipe, seed, run_dir, run_sets)
        outcomes.append(outcome)
        if outcome.status == "failed":
            code = outcome.extra["returncode"]
            if code == Interrupted.exit_code:
                raise Interrupted(f"stella reproduce interrupted in {run_dir} (checkpoint kept): run the same "
                                  f"command again to continue")
            raise RunFailed(f"{recipe} (seed {seed}) failed with exit code {code} (its message is above); the "
                            f"runs before it are kept: fix the cause and run the same command again", code)
        if spec.downstream:
            evaluate_downstream(run_dir)
    stella_cli_child("report", *(str(o.run_dir) for o in outcomes), "--table", spec.report,
                     "--out", str(out_dir / "report"))
    print_times(outcomes)
    if spec.report not in ("downstream", "modality-gap"):
        console.print(chance_line(outcomes[0].run_dir))
    return outcomes


# ----------------------------------------------------------------------------------------------------------
# the analyses' variants: a key at several values, the tasks in several orders


def check_variants(spec: TableSpec, values: str | None, orders: int | None, sets: list[str],
                   recipes: list[Path]) -> tuple[tuple[str, ...], int]:
    """The swept values (--values, else the table's; each checked with every recipe, as `stella train` would) and
    the number of task orders (--orders, else the table's). A --set of the varied key is refused: every variant
    would be the same run."""
    varied = spec.sweep or ("data.tasks" if spec.orders else "")
    for item in sets:
        if varied and item.split("=", 1)[0].strip() == varied:
            raise StellaError(f"--set {item}: this table varies {varied} itself; choose its values with "
                              f"{'--values' if spec.sweep else '--orders'}")
    if values is not None and not spec.sweep:
        raise StellaError("--values: this table varies no recipe key (the memory and temperature tables do)")
    if orders is not None and not spec.orders:
        raise StellaError("--orders: only the task-order tables run several orders of the tasks")
    if orders is not None and orders < 1:
        raise StellaError(f"--orders {orders}: give at least 1 (the recipe's own order)")
    swept = tuple(map(str, spec.values)) if values is None else tuple(v.strip() for v in values.split(",")
                                                                        if v.strip())
    if spec.sweep and not swept:
        raise StellaError(f"--values {values!r}: give comma-separated values of {spec.sweep}, e.g. "
                          f"{','.join(map(str, spec.values))}")
    for recipe in recipes:
        for value in swept:  # a wrong type or range: one line naming the key
            check_method(load_recipe(recipe, [f"{spec.sweep}={value}"]), str(recipe))
    return swept, spec.orders if orders is None else orders


def variants(spec: TableSpec, recipe: Path, swept: tuple[str, ...], orders: int,
             sets: list[str]) -> list[tuple[str, list[str]]]:
    """(part of the run name, --set items) of each variant of a recipe; one plain variant for the other tables."""
    if spec.sweep:
        short = spec.sweep.rsplit(".", 1)[-1]
        return [(f"{short}{value}", [f"{spec.sweep}={value}"]) for value in swept]
    if spec.orders:
        resolved = load_recipe(recipe, [s for s in sets if s.startswith("data.")])
        tasks = resolved.data.tasks or read_meta(Path(resolved.data.root))["tasks"]
        return [(f"order{j + 1}", [f"data.tasks=[{', '.join(order)}]"])
                for j, order in enumerate(task_orders(tasks, orders))]
    return [("", [])]


def task_orders(tasks: list[str], n: int) -> list[list[str]]:
    """n orders of the tasks: the given one, then each new permutation drawn by random.Random(ORDER_SEED + j)."""
    if n > math.factorial(len(tasks)):
        raise StellaError(f"--orders {n}: {len(tasks)} tasks have only {math.factorial(len(tasks))} orders")
    orders, j = [list(tasks)], 1
    while len(orders) < n:
        order = random.Random(ORDER_SEED + j).sample(list(tasks), len(tasks))
        j += 1
        if order not in orders:
            orders.append(order)
    return orders


def scaled_epochs(recipe: Path, fraction: float) -> list[str]:
    """`train.epochs=N` for a fraction of the recipe's own epochs (none when the fraction is 1)."""
    if fraction == 1.0:
        return []
    return [f"train.epochs={max(1, round(load_recipe(recipe).train.epochs * fraction))}"]


def train_once(recipe: Path, seed: int, run_dir: Path, sets: list[str]) -> RunOutcome:
    """One run through the real CLI: skipped when finished, `--resume`d when a checkpoint exists."""
    marker = run_dir / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        return RunOutcome(recipe, seed, run_dir, "skipped", done["seconds"])
    resume = (run_dir / "checkpoints" / "latest.pt").is_file()
    cmd = [sys.executable, "-m", "stella_cli", "train", str(recipe), "--set", f"output.dir={run_dir}",
           "--set", f"train.seed={seed}", *[a for s in sets for a in ("--set", s)]]
    if resume:
        cmd.append("--resume")
    tic = time.perf_counter()
    child = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        returncode = child.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save its checkpoint and exit 130
        returncode = child.wait()
    seconds = time.perf_counter() - tic
    if returncode != 0:
        return RunOutcome(recipe, seed, run_dir, "failed", seconds, {"returncode": returncode})
    atomic_write_text(marker, json.dumps({"recipe": str(recipe), "seed": seed, "seconds": seconds,
                                          "resumed": resume, "command": " ".join(cmd)}, indent=2))
    return RunOutcome(recipe, seed, run_dir, "resumed" if resume else "finished", seconds)


def stella_cli_child(*args: str, capture: bool = False) -> str:
    """`stella ARGS` in a child process; its failure (already reported on screen) stops the reproduction."""
    proc = subprocess.run([sys.executable, "-m", "stella_cli", *args], stdout=subprocess.PIPE if capture else None,
                          text=True)
    if proc.returncode != 0:
        raise RunFailed(f"`stella {' '.join(args[:2])} ...` failed with exit code {proc.returncode} (its message is "
                        f"above); finished runs are kept: run the same command again after fixing it",
                        proc.returncode)
    return proc.stdout or ""


def ensure_synthetic(recipe: Path, sets: list[str]) -> None:
    """Prepare the synthetic benchmark where the recipe looks for it, if it is not there yet."""
    root = Path(load_recipe(recipe, [s for s in sets if s.startswith("data.")]).data.root)
    if (root / "meta.json").is_file() and (root / "retrieval.csv").is_file():
        return
    console.print(f"preparing the synthetic benchmark in {root}")
    stella_cli_child("prep", "synthetic", "--out", str(root))


def evaluate_downstream(run_dir: Path) -> None:
    if not (run_dir / "results" / "classification.json").is_file():
        stella_cli_child("eval", str(run_dir), "--task", "all")


def run_bench(names: tuple[str, ...], out_dir: Path) -> RunOutcome:
    """The efficiency table: `stella bench` at the paper's size, both attention kernels, then the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    method_of = {recipe_suffix(m): m for m in PAPER_METHODS}
    methods = ",".join(method_of[n] for n in names)
    tic = time.perf_counter()
    files = []
    for kernel in ("sdpa", "math"):
        path = out_dir / f"bench_{kernel}.json"
        text = stella_cli_child("bench", "--methods", methods, "--preset", "base", "--attention", kernel, "--json",
                                capture=True)
        atomic_write_text(path, text)
        files.append(str(path))
    stella_cli_child("report", *files, "--table", "efficiency", "--out", str(out_dir / "report"))
    return RunOutcome(Path("-"), 0, out_dir, "finished", time.perf_counter() - tic)


def chance_line(run_dir: Path) -> str:
    """Chance level of the retrieval table: R@K = K / N for a gallery of N clips, averaged over the recipe's K."""
    recipe = load_recipe(run_dir / "config.yaml")
    with open(Path(recipe.data.root) / "retrieval.csv") as f:
        n = sum(1 for _ in f) - 1  # minus the header
    ks = recipe.eval.recall_at
    per_k = ", ".join(f"R@{k} {100 * k / n:.1f}" for k in ks)
    return f"chance with a gallery of {n} clips: {per_k}, avg {100 * sum(ks) / len(ks) / n:.2f}"


def print_times(outcomes: list[RunOutcome]) -> None:
    print_rows("wall time per run", [["recipe", "seed", "run", "status", "time"]]
               + [[o.recipe.stem, str(o.seed), str(o.run_dir), o.status, f"{o.seconds:.0f} s"] for o in outcomes],
               left=4)
    console.print(f"total {sum(o.seconds for o in outcomes) / 60:.1f} min of training over {len(outcomes)} runs "
                  "(skipped runs show the time they took when they ran)")
