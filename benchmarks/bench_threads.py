"""Training steps per second of the demo recipe under OpenMP wait policies and thread counts, idle and loaded.

    python benchmarks/bench_threads.py [--recipe recipes/synthetic.yaml] [--steps 30] [--load 0 2] [--rounds 1]

Each variant runs `stella train RECIPE --stop-after STEPS` in a fresh process (the environment must be set before
torch loads) with the environment below; `--load N` starts N busy-looping processes beside it (a laptop or CI
runner doing other work). Measured per variant: seconds per step between the first and the last metrics.jsonl
line (start-up excluded) and the CPU seconds the run used per step (start-up included). Variants:
- `spin 300000`: GOMP_SPINCOUNT=300000, libgomp's default (what `stella` ran with before issue 13);
- `passive`: OMP_WAIT_POLICY=PASSIVE, idle threads sleep at once;
- `CLI default`: what `stella` sets when the user set none of these (cli.OPENMP_DEFAULTS);
- `spin 1000`, `spin 10000`: other spin counts (GOMP_SPINCOUNT) for comparison;
- `1 thread`: OMP_NUM_THREADS=1 (different float sums: results differ from the 2-thread runs by design).
Variants with the same thread count must end with identical losses; the script checks it. Needs the prepared
data of the recipe (`stella prep`). The variants are interleaved, order rotating per round: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from before import ROOT  # benchmarks/before.py

VARIANTS = {
    "spin 300000 (before)": {"GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "CLI default": {},
    "spin 1000": {"GOMP_SPINCOUNT": "1000"},
    "spin 10000": {"GOMP_SPINCOUNT": "10000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
OPENMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def run_variant(recipe: Path, steps: int, extra_env: dict[str, str], out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_KEYS} | extra_env
    env["PYTHONPATH"] = str(ROOT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "stella_cli", "train", str(recipe), "--stop-after", str(steps),
                           "--quiet", "--set", f"output.dir={out}"], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode not in (0, 130):  # 130: stopped by --stop-after with a checkpoint, as asked
        sys.exit(f"stella train failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x and "step" in x]
    first, last = logged[0], logged[-1]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"s_per_step": (last["time"] - first["time"]) / (last["step"] - first["step"]), "cpu_per_step": cpu / steps,
            "final": {k: v for k, v in last.items() if k.startswith("loss")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "synthetic.yaml")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per run (log every 10)")
    parser.add_argument("--load", type=int, nargs="+", default=[0, 2], help="busy processes beside the run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["spin 300000 (before)", "passive", "CLI default", "1 thread"])
    args = parser.parse_args()
    console = Console(width=150)
    table = Table(title=f"{args.recipe.name}: {args.steps} steps per run, {os.cpu_count()} CPUs, median of "
                        f"{args.rounds} round(s)")
    for col in ("busy processes", "variant", "s / step", "vs before", "CPU s / step", "losses = before"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for load in args.load:
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
            try:
                res: dict[str, list[dict]] = {k: [] for k in args.variants}
                for r in range(args.rounds):
                    order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
                    for k in order:
                        out = Path(tmp) / f"load{load}_round{r}_variant{args.variants.index(k)}"
                        res[k].append(run_variant(args.recipe, args.steps, VARIANTS[k], out))
                        console.print(f"load {load}, round {r + 1}, {k}: {res[k][-1]['s_per_step']:.3f} s/step",
                                      style="dim")
            finally:
                for p in burners:
                    p.kill()
                    p.wait()
            base = args.variants[0]
            sps = {k: statistics.median(x["s_per_step"] for x in v) for k, v in res.items()}
            for k, v in res.items():
                same = "-" if k == "1 thread" else str(v[0]["final"] == res[base][0]["final"])
                failed |= same == "False"
                table.add_row(str(load), k, f"{sps[k]:.3f}", f"{sps[k] / sps[base]:.2f}x",
                              f"{statistics.median(x['cpu_per_step'] for x in v):.3f}", same)
    console.print(table)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
