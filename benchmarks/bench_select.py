"""Audio time-chunk selection: batch-vectorised vs the authors' per-clip loop (method.md §3.6), on CPU.

Paper token counts: L_A = 512 (64 time x 8 frequency tokens), K_A = 256, chunks of 4 time steps. Each timed
iteration is a full `select_audio_chunks` call (chunk draw + greedy fill + ordering) on inputs shaped like one
STELLA step (importance from a softmax, Bernoulli pruning on the 256 candidates). Both variants use the same
generator draws and are checked to return identical orderings. Prints a table; the ratio is from this run.

    python benchmarks/bench_select.py [--iters 20] [--batches 12 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stella_cli.scoring import candidates
from stella_cli.select import prune_mask, select_audio_chunks, select_audio_chunks_loop

L_A, NUM_FREQ, K_A, CHUNK_TIMES = 512, 8, 256, 4


def inputs(B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    I_a = torch.randn(B, L_A, generator=g).mul(2).softmax(dim=1)  # (B, L_A)
    C_a = candidates(I_a, K_A)
    p_a = torch.zeros(B, L_A).scatter(1, C_a, torch.rand(B, K_A, generator=g))  # RCA-like: 0 off the candidates
    return I_a, prune_mask(p_a, g)


def time_per_iter(fn, I_a, z_a, iters: int) -> float:
    for i in range(2):
        fn(I_a, z_a, K_A, NUM_FREQ, CHUNK_TIMES, torch.Generator().manual_seed(i))
    times = []
    for i in range(iters):
        g = torch.Generator().manual_seed(1000 + i)
        t0 = time.perf_counter()
        fn(I_a, z_a, K_A, NUM_FREQ, CHUNK_TIMES, g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[12, 48])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}; L_A={L_A}, F={NUM_FREQ}, "
          f"K_A={K_A}, chunk={CHUNK_TIMES} time steps; median of {args.iters} iterations")
    print(f"{'batch':>6} | {'loop (ms/iter)':>15} | {'vectorised (ms/iter)':>21} | {'speed-up':>9}")
    print(f"{'-' * 6}-+-{'-' * 15}-+-{'-' * 21}-+-{'-' * 9}")
    for B in args.batches:
        I_a, z_a = inputs(B, seed=B)
        a = select_audio_chunks(I_a, z_a, K_A, NUM_FREQ, CHUNK_TIMES, torch.Generator().manual_seed(7))
        b = select_audio_chunks_loop(I_a, z_a, K_A, NUM_FREQ, CHUNK_TIMES, torch.Generator().manual_seed(7))
        if not torch.equal(a, b):
            raise SystemExit(f"batch {B}: vectorised and loop orderings differ")
        t_loop = time_per_iter(select_audio_chunks_loop, I_a, z_a, args.iters)
        t_vec = time_per_iter(select_audio_chunks, I_a, z_a, args.iters)
        print(f"{B:>6} | {t_loop * 1e3:>15.2f} | {t_vec * 1e3:>21.3f} | {t_loop / t_vec:>8.1f}x")


if __name__ == "__main__":
    main()
