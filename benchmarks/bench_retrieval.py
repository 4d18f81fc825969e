"""Retrieval ranks of a large gallery: row-chunked (evaluate.retrieval_scores) vs the whole N x N matrix, on CPU.

Both directions (A->V, V->A) with R@1/5/10, median rank, overall and per task (8 tasks), at N = 10,000 clips by
default. The full variant is the previous code: one (N, N) similarity matrix, `true_pair_ranks` on it and on its
transpose. Each variant runs in its own process, so "extra memory" is that process's peak RSS increase over the
state with the embeddings built (ru_maxrss). Time: median of --repeats calls. Both variants' scores are checked
to agree (ranks equal on random embeddings). Prints a table; ratios come from this run.

    python benchmarks/bench_retrieval.py [--n 10000] [--dim 768] [--threads 2] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from stella_cli.evaluate import recall_at, retrieval_scores, true_pair_ranks

TASKS = [f"task{i + 1}" for i in range(8)]
KS = [1, 5, 10]


def full_matrix_scores(z_a, z_v, task, task_names, ks):
    """The previous implementation: the whole similarity matrix, ranks of it and of its transpose."""
    sim = z_a @ z_v.T
    ranks = {"a2v": true_pair_ranks(sim), "v2a": true_pair_ranks(sim.T)}
    out = {}
    for d, r in ranks.items():
        out[d] = {"all": recall_at(r, ks)}
        for k, name in enumerate(task_names):
            out[d][name] = recall_at(r[task == k], ks)
    return out


def embeddings(n: int, dim: int):
    g = torch.Generator().manual_seed(0)
    z_a = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    z_v = F.normalize(z_a + 1.5 * torch.randn(n, dim, generator=g), dim=-1)
    return z_a, z_v, torch.arange(n) % len(TASKS)


def measure(variant: str, n: int, dim: int, threads: int, chunk: int, repeats: int) -> dict:
    """In this process: time and peak-RSS increase of one variant."""
    torch.set_num_threads(threads)
    z_a, z_v, task = embeddings(n, dim)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fn = (lambda: full_matrix_scores(z_a, z_v, task, TASKS, KS)) if variant == "full" else \
        (lambda: retrieval_scores(z_a, z_v, task, TASKS, KS, chunk=chunk))
    times, scores = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = fn()
        times.append(time.perf_counter() - t0)
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"seconds": statistics.median(times), "extra_mb": extra, "scores": scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.n, args.dim, args.threads, args.chunk, args.repeats)))
        return
    results = {}
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--n", str(args.n), "--dim", str(args.dim),
               "--threads", str(args.threads), "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
        results[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    same = all(results["full"]["scores"][d][t] == results["chunked"]["scores"][d][t]
               for d in ("a2v", "v2a") for t in ["all", *TASKS])
    print(f"torch {torch.__version__}, {args.threads} threads; N = {args.n:,} clips, D = {args.dim}, "
          f"{len(TASKS)} tasks, both directions, R@{'/'.join(map(str, KS))} + MedR; median of {args.repeats}; "
          f"chunk {args.chunk} rows; scores identical: {same}")
    print(f"{'variant':>8} | {'seconds':>8} | {'extra MB':>9}")
    print(f"{'-' * 8}-+-{'-' * 8}-+-{'-' * 9}")
    for variant, r in results.items():
        print(f"{variant:>8} | {r['seconds']:>8.3f} | {r['extra_mb']:>9.0f}")
    f, c = results["full"], results["chunked"]
    print(f"chunked / full: time {c['seconds'] / f['seconds']:.2f}x, extra memory "
          f"{c['extra_mb'] / max(f['extra_mb'], 1e-9):.2f}x")
    if not same:
        raise SystemExit("the two variants' scores differ")


if __name__ == "__main__":
    main()
