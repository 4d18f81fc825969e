"""Clips per second the training loader delivers from the cache, raw vs jpeg frames, 0 / 1 / 2 workers.

    .venv/bin/python benchmarks/bench_data.py                      # builds a reduced synthetic benchmark in a temp dir
    .venv/bin/python benchmarks/bench_data.py --root data/synthetic # an existing prepared folder (its own format)

Measures whole epochs of `build_loader` over the train split with the training augmentations (window, multi-scale
crop, fbank noise and roll), worker start-up included.  Numbers depend on the machine and its load: compare the
ratios within one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from stella_cli.cache import read_meta
from stella_cli.config import DataConfig
from stella_cli.data import AVDataset, build_loader
from stella_cli.synth import SynthConfig, prepare_synthetic


def clips_per_second(root: Path, workers: int, batch_size: int, epochs: int, image_size: int) -> float:
    meta = read_meta(root)
    cfg = DataConfig(dataset=meta["dataset"], root=str(root), image_size=image_size,
                     target_length=meta["spec"]["target_length"], num_mel_bins=meta["spec"]["num_mel_bins"])
    ds = AVDataset(cfg, "train", train=True, seed=0)
    n = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for batch in build_loader(ds, batch_size, shuffle=True, seed=0, epoch=epoch, drop_last=True,
                                  num_workers=workers):
            n += batch["video"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, action="append", help="prepared folder(s); default: build raw + jpeg")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-per-class", type=int, default=8, help="clips per class of the built benchmark")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        roots = args.root
        if not roots:
            cfg = SynthConfig(train_per_class=args.train_per_class, test_per_class=1, retrieval_per_class=1)
            roots = []
            for fmt in ("raw", "jpeg"):
                out = Path(tmp) / fmt
                s = prepare_synthetic(out, seed=0, workers=2, frames_format=fmt, config=cfg)
                console.print(f"built {out}: {sum(s['splits']['train'].values())} train clips, "
                              f"{s['seconds']:.1f} s, {s['bytes'] / 2**20:.1f} MiB")
                roots.append(out)
        table = Table(title=f"train loader, batch {args.batch_size}, {args.epochs} epochs, "
                            f"torch threads {torch.get_num_threads()}")
        for col in ("data", "frames", "workers", "clips/s", "vs first row"):
            table.add_column(col, justify="right")
        first = None
        for root in roots:
            fmt = read_meta(root)["spec"]["frames_format"]
            for w in args.workers:
                rate = clips_per_second(root, w, args.batch_size, args.epochs, args.image_size)
                first = first or rate
                table.add_row(str(root.name), fmt, str(w), f"{rate:.0f}", f"{rate / first:.2f}x")
        console.print(table)


if __name__ == "__main__":
    main()
