"""`stella reproduce`: every run a paper table needs (methods x seeds), resumable, then its report.

A table is a list of recipes (`recipes/<prefix>_<method>.yaml`, the shipped ones outside a clone) run once per
seed. Each run goes through the real
`stella train` in a child process, so a reproduction behaves exactly like the commands README shows, and an
interrupted reproduction is continued by running the same command again:

- a run whose `reproduce.json` marker exists is finished and skipped;
- a run with `checkpoints/latest.pt` is continued with `--resume`;
- any other run starts.

Run directories: `{runs}/{table}/{recipe stem}_s{seed}`. After the runs, `stella report` writes the table into
`{runs}/{table}/report/` and prints it; this module then prints each run's wall time. The table folder is held by
one reproduction at a time (files.holding); its `stella train` children hold their own run directories inside it.

The synthetic tables run on CPUs: their runs are independent, so they go side by side, `--jobs` at a time (default:
one per core), each with one thread and its output in `{runs}/{table}/logs/`. A run's numbers depend on its thread
count, never on what runs beside it, so a run gives the same results alone or in parallel.

The analyses (README "Analyses") run each recipe in several variants, `{recipe stem}_{variant}_s{seed}`: a recipe
key at several values (memory size, AVM temperature), or the tasks in several orders (data.tasks: the recipe's own
order, then seeded permutations). The modality gap needs no runs of its own: it is read from the runs of the
retrieval table at the same scale (every run records it), which it runs or continues in that table's folder.

The initialisation chain (method.md §1.9, §2.5) comes first where a table starts from it: the synthetic tables
start from the backbone pre-trained on the held-out domain and from the AVM pre-trained on it
(`recipes/init_synthetic_heldout.yaml`, `recipes/init_avm_synthetic.yaml`). They are made once, cached where their
recipes put them (`data/synthetic/init/`, beside the data), and reused by every method and seed. Each step's key
is a content hash of its resolved recipe, of its data's meta.json and of the previous step's key, kept in
`chain.json` beside the runs: a changed recipe or data remakes that step and the ones after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stella_cli.cache import read_meta
from stella_cli.config import SELECTIONS, ModelConfig, Recipe, find_recipe, load_recipe, recipe_to_yaml
from stella_cli.console import console, print_rows
from stella_cli.errors import Interrupted, StellaError
from stella_cli.factory import (METHODS, PAPER_METHODS, REPLAY_METHODS, check_initial_checkpoint, check_method,
                                recipe_suffix)
from stella_cli.files import atomic_write_text, holding, make_dir
from stella_cli.synth import GENERATOR_VERSION, SynthConfig

PAPER_RECIPES = tuple(recipe_suffix(m) for m in PAPER_METHODS)  # recipe suffixes in the paper's row order
CONTINUAL_RECIPES = tuple(recipe_suffix(m) for m in PAPER_METHODS if not METHODS[m].union)  # all but Multitask
REPLAY_RECIPES = tuple(recipe_suffix(m) for m in REPLAY_METHODS)  # STELLA, STELLA+ and the replay baselines
MARKER = "reproduce.json"
CHAIN = "chain.json"  # keys of the initialisation chain's runs, beside them
SYNTHETIC_INIT = ("init_synthetic_heldout", "init_avm_synthetic")  # the synthetic tables' initialisation chain

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
    full_seeds: tuple[int, ...] = (2021, 2022, 2023)  # --full
    synthetic: bool = False  # prepare the synthetic benchmark when it is missing
    bench: bool = False  # the efficiency table: `stella bench` instead of training runs
    downstream: bool = False  # `stella eval --task all` on every finished run
    init: tuple[str, ...] = ()  # recipes (stems) of the initialisation chain made before the runs, in order
    parallel: bool = False  # CPU runs side by side (--jobs, one thread each), output to RUNS/TABLE/logs/
    sweep: str = ""  # analyses: each recipe at every one of `values` of this key
    values: tuple[float, ...] = ()
    orders: int = 0  # analyses: each recipe in this many orders of its tasks
    default_names: tuple[str, ...] = ()  # the default (laptop) budget runs these of `names` (--full, --methods: any)
    runs_of: str = ""  # run (and reuse) the runs of this table, in its folder


def synthetic_analysis(names: tuple[str, ...], report: str, **kw: Any) -> TableSpec:
    """An analysis at the synthetic scale: the synthetic table's recipes, start (its chain) and runner."""
    return TableSpec("synthetic", names, report, synthetic=True, init=SYNTHETIC_INIT, parallel=True, **kw)


TABLES: dict[str, TableSpec] = {
    # The laptop default: every method of the paper on the synthetic stream from the pre-trained start, at the
    # recipes' budget (10 epochs per task), seed 2021; --full runs the rest of the paper's three seeds, 2022 and 2023,
    # so that the paired differences have intervals (README "The synthetic table" says what each shows).
    # STELLA also runs with a random AVM (the authors' scripts, B2): does the AVM pre-training matter?
    "synthetic": TableSpec("synthetic", (*PAPER_RECIPES, "stella_random_avm"), "retrieval",
                           synthetic=True, init=SYNTHETIC_INIT, parallel=True),
    "synthetic-ablation": TableSpec("synthetic_ablation", SELECTIONS, "ablation", synthetic=True,
                                    init=SYNTHETIC_INIT, parallel=True),
    # only the synthetic initialisation chain (make demo, or a recipe of your own that starts from it)
    "synthetic-init": TableSpec("synthetic", (), "", synthetic=True, init=SYNTHETIC_INIT),
    "vggsound-retrieval": TableSpec("vggsound", PAPER_RECIPES, "retrieval", seeds=(2021, 2022, 2023)),
    "audioset-retrieval": TableSpec("audioset", PAPER_RECIPES, "retrieval", seeds=(2021, 2022, 2023)),
    "ablation": TableSpec("vggsound_ablation", SELECTIONS, "ablation", seeds=(2021, 2022, 2023)),
    "downstream": TableSpec("vggsound", PAPER_RECIPES, "downstream", downstream=True),
    "efficiency": TableSpec("", PAPER_RECIPES, "efficiency", bench=True),
    # the analyses (README "Analyses"): synthetic from the synthetic table's start and at its budget, a few methods
    # by default (--methods: any of `names`; --full: all, and 3 seeds); the paper's scale with its recipes, one seed
    "synthetic-memory": synthetic_analysis(REPLAY_RECIPES, "memory", sweep="method.memory_size",
                                           values=SYNTHETIC_MEMORY, default_names=("er", "derpp", "stella",
                                                                                   "stella_plus")),
    "synthetic-task-order": synthetic_analysis(CONTINUAL_RECIPES, "task-order", orders=3, default_names=(
        "finetune", "er", "derpp", "stella", "stella_plus")),
    "synthetic-modality-gap": synthetic_analysis(PAPER_RECIPES, "modality-gap", runs_of="synthetic", default_names=(
        "multitask", "finetune", "er", "derpp", "stella", "stella_plus")),
    "synthetic-temperature": synthetic_analysis(("stella", "stella_plus"), "temperature", default_names=("stella",),
                                                sweep="method.stella.att_temperature",
                                                values=(0.1, 0.2, 0.4, 0.8, 1.6)),
    "vggsound-memory": TableSpec("vggsound", REPLAY_RECIPES, "memory", sweep="method.memory_size",
                                 values=VGGSOUND_MEMORY),
    "audioset-memory": TableSpec("audioset", REPLAY_RECIPES, "memory", sweep="method.memory_size",
                                 values=AUDIOSET_MEMORY),
    "vggsound-task-order": TableSpec("vggsound", CONTINUAL_RECIPES, "task-order", orders=3),
    "audioset-task-order": TableSpec("audioset", CONTINUAL_RECIPES, "task-order", orders=3),
    "vggsound-modality-gap": TableSpec("vggsound", PAPER_RECIPES, "modality-gap", seeds=(2021, 2022, 2023),
                                       runs_of="vggsound-retrieval"),
    "audioset-modality-gap": TableSpec("audioset", PAPER_RECIPES, "modality-gap", seeds=(2021, 2022, 2023),
                                       runs_of="audioset-retrieval"),
    "vggsound-temperature": TableSpec("vggsound", ("stella", "stella_plus"), "temperature", default_names=("stella",),
                                      sweep="method.stella.att_temperature", values=TEMPERATURES),
    "audioset-temperature": TableSpec("audioset", ("stella", "stella_plus"), "temperature", default_names=("stella",),
                                      sweep="method.stella.att_temperature", values=TEMPERATURES),
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
    seconds: float = 0.0  # wall
    cpu: float = 0.0  # user + sys of the child: what the run costs on a machine shared with other work
    extra: dict[str, Any] = field(default_factory=dict)


def select_names(spec: TableSpec, methods: str | None, full: bool = False) -> tuple[str, ...]:
    """`--methods er,stella` keeps those (in the table's order); unknown names are one-line errors. Without it,
    the table's default methods (--full: all)."""
    if not methods:
        return spec.default_names if spec.default_names and not full else spec.names
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
              recipes: Path = Path("recipes"), jobs: int | None = None, values: str | None = None,
              orders: int | None = None) -> list[RunOutcome]:
    """Run (or continue) every run of `table`, then report it. Returns one outcome per run."""
    started = time.perf_counter()
    if table not in TABLES:
        raise StellaError(f"stella reproduce: unknown table {table!r}; choose one of {', '.join(TABLES)}")
    spec = TABLES[table]
    names = select_names(spec, methods, full)
    out_dir = runs / table
    with holding(out_dir, advice="wait for it to end or stop it (the same command continues it), or choose "
                                 "another --runs folder"):  # one reproduction of a table at a time
        if spec.bench:
            return [run_bench(names, out_dir)]
        return run_table(table, spec, names, runs, seeds=seeds, overrides=overrides, full=full, recipes=recipes,
                         jobs=jobs, values=values, orders=orders, started=started)


def run_table(table: str, spec: TableSpec, names: tuple[str, ...], runs: Path, *, seeds: str | None,
              overrides: list[str] | None, full: bool, recipes: Path, jobs: int | None, values: str | None,
              orders: int | None, started: float) -> list[RunOutcome]:
    """reproduce() in the held table folder: the chain, every run through `stella train`, the report, the times."""
    out_dir = runs / table
    seed_list = parse_seeds(seeds, spec, full)
    workers = parse_jobs(jobs, spec)
    sets = list(overrides or [])
    recipe_paths = [find_recipe(recipes / f"{spec.prefix}_{name}.yaml") for name in names]  # ./recipes or shipped
    init_paths = [find_recipe(recipes / f"{stem}.yaml") for stem in spec.init]
    resolved = {r: load_recipe(r, sets) for r in recipe_paths}  # a bad value stops before any run
    models = {r: resolved[r].model for r in recipe_paths}
    if recipe_paths:  # only the steps some run starts from (none for --set model.checkpoint=random ...)
        init_paths = chain_needed(init_paths, list(models.values()))
    swept, n_orders = check_variants(spec, values, orders, sets, recipe_paths)
    if spec.synthetic:
        ensure_synthetic(recipe_paths, sets, init_paths)
    plan = {r: variants(spec, r, swept, n_orders, sets) for r in recipe_paths}  # task orders need the data
    chain = chain_jobs(init_paths)
    run_root = runs / (spec.runs_of or table)
    todo = [Job(r, seed, run_root / run_name(r, tag, seed), (*variant_sets, *sets),
                needs=starts_from(models[r], chain), tag=tag)
            for seed in seed_list for r in recipe_paths for tag, variant_sets in plan[r]]
    check_starts(todo, resolved, chain)
    if spec.parallel or not todo:  # the chain's runs go side by side with the table's that need only its backbone
        outcomes = run_parallel(chain + todo, workers, out_dir / "logs")
        chain_outcomes, outcomes = outcomes[:len(chain)], outcomes[len(chain):]
        if not todo:
            console.print("init chain ready: " + ", ".join(str(j.run_dir / "checkpoints" / "latest.pt") for j in chain))
            return chain_outcomes
    else:
        chain_outcomes, outcomes = [], []
        for i, job in enumerate(todo, start=1):
            console.rule(f"[{i}/{len(todo)}] {job.name}")
            outcomes.append(check_outcome(train_once(job)))
            if spec.downstream:
                evaluate_downstream(job.run_dir)
    stella_cli_child("report", *(str(o.run_dir) for o in outcomes), "--table", spec.report,
                     "--out", str(out_dir / "report"))
    print_times(chain_outcomes + outcomes, workers, time.perf_counter() - started)
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


def parse_jobs(jobs: int | None, spec: TableSpec) -> int:
    """Runs side by side: --jobs, default one per core the process may use (parallel tables), else 1."""
    if jobs is None and not spec.parallel:
        return 1
    if jobs is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if jobs < 1:
        raise StellaError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and not spec.parallel:
        raise StellaError("--jobs: this table runs one run at a time (its runs use the GPUs)")
    return jobs


def check_starts(todo: list[Job], resolved: dict[Path, Recipe], chain: list[Job]) -> None:
    """Before the first run: every run that will start (not finished, no checkpoint) has its initial checkpoint
    (a paper table's recipes start from the initialisation chain's), so the table never stops hours in. A start
    point that this table's chain makes is not checked: the chain runs first."""
    made = {job.run_dir / "checkpoints" / "latest.pt" for job in chain}
    for job in todo:
        recipe = resolved[job.recipe]
        if starts_fresh(job.run_dir) and Path(recipe.model.checkpoint) not in made:
            check_initial_checkpoint(recipe, str(job.recipe))


def starts_fresh(run_dir: Path) -> bool:
    """Neither finished (its marker) nor resumable (a checkpoint): the run starts from its recipe."""
    return not (run_dir / MARKER).is_file() and not (run_dir / "checkpoints" / "latest.pt").is_file()


def check_outcome(outcome: RunOutcome) -> RunOutcome:
    """A failed run stops the reproduction: interrupted (130) with its checkpoint kept, or with its exit code."""
    if outcome.status == "failed":
        code = outcome.extra["returncode"]
        if code == Interrupted.exit_code:
            raise Interrupted(f"stella reproduce interrupted in {outcome.run_dir} (checkpoint kept): run the same "
                              f"command again to continue")
        raise RunFailed(f"{outcome.recipe} (seed {outcome.seed}) failed with exit code {code} (its message is "
                        f"above); the runs before it are kept: fix the cause and run the same command again", code)
    return outcome


@dataclass(frozen=True)
class Job:
    """One run of a table: `stella train RECIPE --set output.dir=RUN_DIR --set train.seed=SEED --set SETS...`."""

    recipe: Path
    seed: int
    run_dir: Path
    sets: tuple[str, ...]
    needs: tuple[Path, ...] = ()  # run directories that must have finished first (the chain's, for its checkpoints)
    tag: str = ""  # the variant of an analysis (e.g. memory_size20, order2), in its name

    @property
    def ready(self) -> bool:
        return all((need / MARKER).is_file() for need in self.needs)

    @property
    def name(self) -> str:
        """The run's name on screen and of its log: the recipe, the variant and the seed."""
        return run_name(self.recipe, self.tag, self.seed)


def run_name(recipe: Path, tag: str, seed: int) -> str:
    """`{recipe stem}_s{seed}`, or `{recipe stem}_{tag}_s{seed}` for a variant of an analysis."""
    return "_".join(filter(None, (recipe.stem, tag, f"s{seed}")))


def train_command(job: Job) -> tuple[list[str], bool]:
    """The `stella train` command of a job, with --resume when it has a checkpoint; and whether it resumes."""
    resume = (job.run_dir / "checkpoints" / "latest.pt").is_file()
    cmd = [sys.executable, "-m", "stella_cli", "train", str(job.recipe), "--set", f"output.dir={job.run_dir}",
           "--set", f"train.seed={job.seed}", *[a for s in job.sets for a in ("--set", s)]]
    return cmd + (["--resume"] if resume else []), resume


def finished(job: Job) -> RunOutcome | None:
    """The outcome of a run finished before (its marker), or None."""
    marker = job.run_dir / MARKER
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    return RunOutcome(job.recipe, job.seed, job.run_dir, "skipped", done["seconds"], done.get("cpu_seconds", 0.0))


def finish(job: Job, cmd: list[str], resume: bool, ended: tuple[int, float], seconds: float) -> RunOutcome:
    """The outcome of a child that ended (exit code, CPU seconds); a finished run gets its marker."""
    returncode, cpu = ended
    if returncode != 0:
        return RunOutcome(job.recipe, job.seed, job.run_dir, "failed", seconds, cpu, {"returncode": returncode})
    atomic_write_text(job.run_dir / MARKER, json.dumps({"recipe": str(job.recipe), "seed": job.seed,
                                                        "seconds": seconds, "cpu_seconds": cpu, "resumed": resume,
                                                        "command": " ".join(cmd)}, indent=2))
    return RunOutcome(job.recipe, job.seed, job.run_dir, "resumed" if resume else "finished", seconds, cpu)


def reap(child: subprocess.Popen, block: bool = True) -> tuple[int, float] | None:
    """(exit code, CPU seconds user + sys) of a child that ended, or None while it runs (block=False)."""
    pid, status, usage = os.wait4(child.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return child.returncode, usage.ru_utime + usage.ru_stime


def train_once(job: Job) -> RunOutcome:
    """One run through the real CLI, its output on this terminal: skipped when finished, `--resume`d when a
    checkpoint exists."""
    done = finished(job)
    if done:
        return done
    cmd, resume = train_command(job)
    tic = time.perf_counter()
    child = subprocess.Popen(cmd, env=os.environ.copy())
    # `docker stop` and schedulers send SIGTERM to this process alone (PID 1 of a container): pass it on, so the run
    # saves its checkpoint and exits 130, as it does when the signal reaches it directly
    previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        ended = reap(child)
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save its checkpoint and exit 130
        ended = reap(child)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return finish(job, cmd, resume, ended, time.perf_counter() - tic)


def one_thread_env() -> dict[str, str]:
    """A child's environment with one intra-op thread (the user's OMP_NUM_THREADS wins): runs side by side do not
    compete for cores, and a run's numbers are the same alone or in parallel (float sums depend on the thread count)."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_parallel(todo: list[Job], workers: int, log_dir: Path) -> list[RunOutcome]:
    """Every job, `workers` at a time, each child's output in LOG_DIR/<run>.log; one line per run on screen.

    A failed run lets the running ones finish and starts no new one; Ctrl-C reaches every child (each saves a
    checkpoint at its next step and exits 130), and so does a SIGTERM sent to this process alone (`docker stop`), so
    the same command continues them all."""
    make_dir(log_dir)
    outcomes: dict[Job, RunOutcome] = {}
    queue, running = list(todo), {}
    terminated: list[int] = []

    def pass_on(signum: int, _frame: Any) -> None:
        terminated.append(signum)
        for child in running:
            child.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        return run_jobs(todo, workers, log_dir, outcomes, queue, running, terminated)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_jobs(todo: list[Job], workers: int, log_dir: Path, outcomes: dict[Job, RunOutcome], queue: list[Job],
             running: dict[subprocess.Popen, tuple], terminated: list[int]) -> list[RunOutcome]:
    """run_parallel's loop: start ready jobs while there is room, reap the ended ones, one line for each."""
    total, failed, stopping = len(todo), None, False
    console.print(f"{total} runs, {workers} at a time with one thread each; their output goes to {log_dir}/")
    while queue or running:
        try:
            stopping = stopping or bool(terminated)
            while queue and len(running) < workers and failed is None and not stopping:
                job = next((j for j in queue if j.ready), None)
                if job is None:  # every queued run waits for a running one
                    break
                queue.remove(job)
                if (done := finished(job)) is not None:
                    outcomes[job] = done
                    console.print(f"[{len(outcomes)}/{total}] {job.name}: finished before ({done.seconds:.0f} s)")
                    continue
                cmd, resume = train_command(job)
                log = open(log_dir / f"{job.name}.log", "a")
                child = subprocess.Popen(cmd, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT)
                running[child] = (job, cmd, resume, time.perf_counter(), log)
            if not running and (failed is not None or stopping or not any(j.ready for j in queue)):
                break
            time.sleep(0.2)
            for child, ended in [(c, e) for c in list(running) if (e := reap(c, block=False)) is not None]:
                job, cmd, resume, tic, log = running.pop(child)
                log.close()
                outcomes[job] = outcome = finish(job, cmd, resume, ended, time.perf_counter() - tic)
                console.print(f"[{len(outcomes)}/{total}] {job.name}: {outcome.status} ({outcome.seconds:.0f} s, "
                              f"{outcome.cpu:.0f} s of CPU){run_scores(job.run_dir)}")
                if outcome.status == "failed":
                    console.print(f"{job.name} ({log.name}): {log_tail(Path(log.name))}", soft_wrap=True,
                                  markup=False)
                    failed = failed or outcome
        except KeyboardInterrupt:  # from the terminal the children got it too; pass it on for a plain kill -INT
            stopping = True
            for child in running:
                child.send_signal(signal.SIGINT)
    if failed is not None or stopping:
        check_outcome(failed or next((o for o in outcomes.values() if o.status == "failed"),
                                     RunOutcome(Path("-"), 0, log_dir, "failed", extra={"returncode": 130})))
    return [outcomes[job] for job in todo]


def run_scores(run_dir: Path) -> str:
    """', A->V A 18.3, V->A A 17.0' from a finished run's summary (avg R@K), or ''."""
    path = run_dir / "results" / "summary.json"
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text())
    return "".join(f", {name} A {summary[d]['avg']['A']:.1f}" for d, name in (("a2v", "A->V"), ("v2a", "V->A"))
                   if summary.get(d, {}).get("avg", {}).get("A") is not None)


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a child's log: its one-line error."""
    text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:]) or "(no output)"


# ----------------------------------------------------------------------------------------------------------
# the initialisation chain: made once, reused until its recipe or its data changes


def chain_key(recipe: Path, previous: str) -> str:
    """sha256 of the resolved recipe, of its data's meta.json and of the previous step's key."""
    resolved = load_recipe(recipe)
    meta = Path(resolved.data.root) / "meta.json"
    if not meta.is_file():
        raise StellaError(f"{meta}: {recipe} trains on {resolved.data.root}, which is not prepared (for the "
                          f"synthetic held-out domain: stella prep synthetic)")
    digest = hashlib.sha256()
    for part in (recipe_to_yaml(resolved).encode(), meta.read_bytes(), previous.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def chain_jobs(steps: list[Path]) -> list[Job]:
    """The chain's runs in order, each needing the one before. A step whose key changed (or that no key names)
    loses its run directory, to be made again; one with its key is reused when finished, else continued."""
    jobs, key = [], ""
    for recipe in steps:
        key = chain_key(recipe, key)
        resolved = load_recipe(recipe)
        run_dir = Path(resolved.output.dir)
        keys_file = run_dir.parent / CHAIN
        keys = json.loads(keys_file.read_text()) if keys_file.is_file() else {}
        if keys.get(run_dir.name, {}).get("key") != key:
            if run_dir.exists():
                console.print(f"init chain: {recipe} or its data changed since {run_dir} was made: making it again")
                shutil.rmtree(run_dir)
            make_dir(run_dir.parent)
            keys[run_dir.name] = {"key": key, "recipe": str(recipe)}
            atomic_write_text(keys_file, json.dumps(keys, indent=1))
        elif (run_dir / MARKER).is_file():
            console.print(f"init chain: reusing {run_dir} ({recipe}, key {key[:12]})")
        jobs.append(Job(recipe, resolved.train.seed, run_dir, (), needs=(jobs[-1].run_dir,) if jobs else ()))
    return jobs


def chain_needed(steps: list[Path], models: list[ModelConfig]) -> list[Path]:
    """The chain's steps up to the last one whose checkpoint a run of the table loads: a table whose runs all start
    elsewhere makes none (a step needs the steps before it)."""
    loads = {Path(p) for m in models for p in (m.checkpoint, m.avm.checkpoint) if p}
    outputs = [Path(load_recipe(step).output.dir) / "checkpoints" / "latest.pt" for step in steps]
    last = max((i for i, out in enumerate(outputs) if out in loads), default=-1)
    return steps[:last + 1]


def starts_from(model: ModelConfig, chain: list[Job]) -> tuple[Path, ...]:
    """The chain's run directories whose checkpoints a run loads (model.checkpoint, model.avm.checkpoint)."""
    loads = {Path(p) for p in (model.checkpoint, model.avm.checkpoint) if p}
    return tuple(job.run_dir for job in chain if job.run_dir / "checkpoints" / "latest.pt" in loads)


def stella_cli_child(*args: str, capture: bool = False) -> str:
    """`stella ARGS` in a child process; its failure (already reported on screen) stops the reproduction."""
    proc = subprocess.run([sys.executable, "-m", "stella_cli", *args], stdout=subprocess.PIPE if capture else None,
                          text=True)
    if proc.returncode != 0:
        raise RunFailed(f"`stella {' '.join(args[:2])} ...` failed with exit code {proc.returncode} (its message is "
                        f"above); finished runs are kept: run the same command again after fixing it",
                        proc.returncode)
    return proc.stdout or ""


def ensure_synthetic(recipes: list[Path], sets: list[str], init: list[Path]) -> None:
    """Prepare the synthetic benchmark where the table's recipes look for it, with its held-out domain (where the
    initialisation chain trains), if either is not there yet."""
    heldout = [Path(load_recipe(p).data.root) for p in init]
    root = Path(load_recipe(recipes[0], [s for s in sets if s.startswith("data.")]).data.root) if recipes else \
        heldout[0].parent
    if all((r / "meta.json").is_file() and (r / "retrieval.csv").is_file() for r in [root, *heldout]):
        for folder in (root, *heldout):
            version = read_meta(folder).get("generator", {}).get("version")
            if version != GENERATOR_VERSION:
                raise StellaError(f"{folder / 'meta.json'}: prepared by version {version} of the synthetic generator, "
                                  f"this is version {GENERATOR_VERSION} (a gallery of 400 clips since version 3); "
                                  f"delete the folder (rm -r {root}) and run the same command again")
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


def print_times(outcomes: list[RunOutcome], workers: int = 1, wall: float | None = None) -> None:
    """Each run's wall and CPU time; the totals, and the reproduction's own wall time."""
    print_rows("time per run", [["recipe", "seed", "run", "status", "wall", "CPU"]]
               + [[o.recipe.stem, str(o.seed), str(o.run_dir), o.status, f"{o.seconds:.0f} s", f"{o.cpu:.0f} s"]
                  for o in outcomes], left=4)
    side = f", {workers} side by side" if workers > 1 else ""
    took = f"; this command took {wall / 60:.1f} min" if wall is not None else ""
    console.print(f"{len(outcomes)} runs{side}: {sum(o.seconds for o in outcomes) / 60:.1f} min of wall time and "
                  f"{sum(o.cpu for o in outcomes) / 60:.1f} min of CPU time in all (skipped runs show what they took "
                  f"when they ran){took}")
