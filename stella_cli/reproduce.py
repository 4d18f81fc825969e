"""`stella reproduce`: every run a paper table needs (methods x seeds), resumable, then its report.

A table is a list of recipes (`recipes/<prefix>_<method>.yaml`, the shipped ones outside a clone) run once per
seed. Each run goes through the real `stella train` in a child process, so a reproduction behaves exactly like the
commands README shows, and an interrupted reproduction is continued by running the same command again:

- a run whose `reproduce.json` marker exists is finished and skipped;
- a run with `checkpoints/latest.pt` is continued with `--resume`;
- any other run starts.

Run directories: `{runs}/{table}/{recipe stem}_s{seed}`. After the runs, `stella report` writes the table into
`{runs}/{table}/report/` and prints it; this module then prints each run's wall time. The table folder is held by
one reproduction at a time (files.holding); its `stella train` children hold their own run directories inside it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from stella_cli.config import SELECTIONS, find_recipe, load_recipe
from stella_cli.console import console, print_rows
from stella_cli.errors import Interrupted, StellaError
from stella_cli.factory import PAPER_METHODS, check_initial_checkpoint, recipe_suffix
from stella_cli.files import atomic_write_text, holding, make_dir

PAPER_RECIPES = tuple(recipe_suffix(m) for m in PAPER_METHODS)  # recipe suffixes in the paper's row order
MARKER = "reproduce.json"


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


def select_names(spec: TableSpec, methods: str | None) -> tuple[str, ...]:
    """`--methods er,stella` keeps those (in the table's order); unknown names are one-line errors."""
    if not methods:
        return spec.names
    wanted = [recipe_suffix(m.strip()) for m in methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in spec.names]
    if unknown:
        raise StellaError(f"--methods: {', '.join(unknown)} not in this table; choose from {', '.join(spec.names)}")
    return tuple(n for n in spec.names if n in wanted)


def parse_seeds(text: str | None, spec: TableSpec, full: bool) -> tuple[int, ...]:
    if not text:
        return spec.full_seeds if full else spec.seeds
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise StellaError(f"--seeds {text!r}: expected comma-separated integers, e.g. 2021,2022,2023") from None
    if not seeds:
        raise StellaError("--seeds: give at least one seed")
    return seeds


def reproduce(table: str = "synthetic", *, seeds: str | None = None, methods: str | None = None,
              overrides: list[str] | None = None, full: bool = False, runs: Path = Path("runs"),
              recipes: Path = Path("recipes")) -> list[RunOutcome]:
    """Run (or continue) every run of `table`, then report it. Returns one outcome per run."""
    if table not in TABLES:
        raise StellaError(f"stella reproduce: unknown table {table!r}; choose one of {', '.join(TABLES)}")
    spec = TABLES[table]
    names = select_names(spec, methods)
    out_dir = runs / table
    with holding(out_dir, advice="wait for it to end or stop it (the same command continues it), or choose "
                                 "another --runs folder"):  # one reproduction of a table at a time
        if spec.bench:
            return [run_bench(names, out_dir)]
        return run_table(table, names, out_dir, seeds=seeds, overrides=overrides, full=full, recipes=recipes)


def run_table(table: str, names: tuple[str, ...], out_dir: Path, *, seeds: str | None, overrides: list[str] | None,
              full: bool, recipes: Path) -> list[RunOutcome]:
    """reproduce() in the held table folder: every run through `stella train`, then the report and the times."""
    spec = TABLES[table]
    seed_list = parse_seeds(seeds, spec, full)
    sets = list(overrides or [])
    recipe_paths = [find_recipe(recipes / f"{spec.prefix}_{name}.yaml") for name in names]  # ./recipes or shipped
    budget = {r: [] if full else scaled_epochs(r, spec.epochs_fraction) for r in recipe_paths}
    check_starts(out_dir, recipe_paths, seed_list, budget, sets)
    if spec.synthetic:
        ensure_synthetic(recipe_paths[0], sets)
    outcomes = []
    total = len(recipe_paths) * len(seed_list)
    for i, (recipe, seed) in enumerate(((r, s) for r in recipe_paths for s in seed_list), start=1):
        run_dir = run_dir_of(out_dir, recipe, seed)
        console.rule(f"[{i}/{total}] {recipe.stem}, seed {seed}")
        outcome = train_once(recipe, seed, run_dir, [*budget[recipe], *sets])  # the user's --set come last: they win
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
    if spec.report in ("retrieval", "ablation"):
        console.print(chance_line(outcomes[0].run_dir))
    return outcomes


def check_starts(out_dir: Path, recipes: list[Path], seeds: tuple[int, ...], budget: dict[Path, list[str]],
                 sets: list[str]) -> None:
    """Before the first run: every run that will start (not finished, no checkpoint) has its initial checkpoint
    (a paper table's recipes start from the initialisation chain's), so the table never stops hours in."""
    for recipe in recipes:
        if any(starts_fresh(run_dir_of(out_dir, recipe, s)) for s in seeds):
            check_initial_checkpoint(load_recipe(recipe, [*budget[recipe], *sets]), str(recipe))


def run_dir_of(out_dir: Path, recipe: Path, seed: int) -> Path:
    return out_dir / f"{recipe.stem}_s{seed}"


def starts_fresh(run_dir: Path) -> bool:
    """Neither finished (its marker) nor resumable (a checkpoint): `train_once` starts it from the recipe."""
    return not (run_dir / MARKER).is_file() and not (run_dir / "checkpoints" / "latest.pt").is_file()


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
    # `docker stop` and schedulers send SIGTERM to this process alone (PID 1 of a container): pass it on, so the run
    # saves its checkpoint and exits 130, as it does when the signal reaches it directly
    previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        returncode = child.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save its checkpoint and exit 130
        returncode = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
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
    make_dir(out_dir)
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
