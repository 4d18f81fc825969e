"""Zero-shot audio<->video retrieval, the accuracy matrix, average accuracy and forgetting (method.md §6.1-6.2).

After task l the retrieval clips of *all* tasks form one gallery; clip i's audio and video are a true pair.
a(l, k) = R@K of task k's queries against the whole gallery after training task l (x100).
    A               = mean_k a(T, k)
    F_conventional  = 1/(T-1) * sum_{k<T} max_{k<=l<T} (a(l,k) - a(T,k))
    F_as_coded      = 1/(T-1) * sum_{k<=T} max_{l<T} (a(l,k) - a(T,k))      (the authors' script, method.md §9.3 B15)
The same embeddings give the modality gap between the audio and the video embeddings (modality_gap).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stella_cli.config import Recipe
from stella_cli.data import AVDataset, build_loader
from stella_cli.files import atomic_write_text, make_dir

DIRECTIONS = ("a2v", "v2a")  # audio queries -> video candidates, and the reverse


@torch.no_grad()
def embed_gallery(model: torch.nn.Module, loader, device: torch.device,
                  amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Retrieval embeddings of every clip in `loader`: z_a, z_v (N, D) L2-normalised, task (N,) long.

    Runs on one process over the whole gallery (no distributed sampler), so no clip is dropped (method.md §9.3 B16).
    """
    was_training = model.training
    model.eval()
    z_a, z_v, tasks = [], [], []
    for batch in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            a, v = model.retrieval_embed(batch["audio"].to(device), batch["video"].to(device))
        z_a.append(a.float().cpu())
        z_v.append(v.float().cpu())
        tasks.append(batch["task"])
    model.train(was_training)
    return torch.cat(z_a), torch.cat(z_v), torch.cat(tasks)


def gallery_scores(backbone: torch.nn.Module, recipe: Recipe, tasks: list[str], device: torch.device,
                   amp_dtype: torch.dtype | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Embed the retrieval split of `tasks` (one gallery) and score both directions (method.md §6.1)."""
    return gallery_row(backbone, recipe, tasks, device, amp_dtype)["scores"]


def gallery_row(backbone: torch.nn.Module, recipe: Recipe, tasks: list[str], device: torch.device,
                amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """One row of results/retrieval.json from one embedding of the gallery: {'scores': retrieval_scores,
    'modality_gap': modality_gap} (the gap over the whole gallery, README "The modality gap")."""
    gallery = AVDataset(recipe.data, "retrieval", tasks=tasks, train=False, seed=recipe.train.seed)
    loader = build_loader(gallery, recipe.eval.batch_size, shuffle=False, seed=0, epoch=0, drop_last=False,
                          num_workers=recipe.data.num_workers)
    z_a, z_v, task = embed_gallery(backbone, loader, device, amp_dtype)
    return {"scores": retrieval_scores(z_a, z_v, task, gallery.task_names, recipe.eval.recall_at),
            "modality_gap": modality_gap(z_a, z_v)}


def modality_gap(z_a: Tensor, z_v: Tensor) -> dict[str, float]:
    """The modality gap of Liang et al. (2022) and the spread of each modality, on (N, D) embeddings.

    Every embedding is L2-normalised (again: retrieval_embed already does), then with the centroids
    mu_a = mean_i z_a[i] / |z_a[i]| and mu_v likewise:
        gap      = |mu_a - mu_v|                              (0: the two clouds share a centre; at most 2)
        spread_m = sqrt(mean_i |z_m[i] - mu_m|^2) = sqrt(1 - |mu_m|^2)   for m = a, v
    spread is the root-mean-square distance to the modality's own centroid: 0 when every clip embeds to one
    point, 1 when the centroid is the origin (the embeddings fill the sphere evenly around it).
    """
    u_a = torch.nn.functional.normalize(z_a.double(), dim=1)
    u_v = torch.nn.functional.normalize(z_v.double(), dim=1)
    mu_a, mu_v = u_a.mean(dim=0), u_v.mean(dim=0)
    return {"gap": (mu_a - mu_v).norm().item(),
            "spread_a": (u_a - mu_a).pow(2).sum(dim=1).mean().sqrt().item(),
            "spread_v": (u_v - mu_v).pow(2).sum(dim=1).mean().sqrt().item()}


TIE_TOLERANCE = 1e-6  # cosine similarities this close to the true pair's count as ties (float32 rounding)


def true_pair_ranks(sim: Tensor, tol: float = TIE_TOLERANCE) -> Tensor:
    """0-based rank of the true candidate (the diagonal) in each row of sim (queries, candidates).

    Ties count against the query: without ties this is the authors' sorted position (retrieval.py
    compute_metrics); with ties (a collapsed model) it cannot inflate R@1. A candidate within `tol` of the true
    pair's similarity is a tie, so the same gallery gives the same ranks however its products are blocked
    (one matrix, tiles of it, another thread count), which round differently in the last bits.
    """
    diag = sim.diagonal().unsqueeze(1)  # (N, 1)
    return (sim >= diag - tol).sum(dim=1) - 1  # (N,)


def pair_ranks(z_a: Tensor, z_v: Tensor, chunk: int = 2048, tol: float = TIE_TOLERANCE) -> tuple[Tensor, Tensor]:
    """true_pair_ranks of sim = z_a @ z_v.T and of sim.T, one (chunk, chunk) tile of sim at a time.

    z_a, z_v: (N, D), row i of both is a true pair. Returns the A->V and V->A 0-based ranks (N,) long. Each tile is
    computed once and counted for both directions: row i of a tile against sim[i, i], column j against sim[j, j]
    (ties within `tol` count against the query, as in true_pair_ranks). Peak extra memory: one tile and its
    comparison, not the N x N matrix.
    """
    N = z_a.shape[0]
    starts = range(0, N, chunk)
    diag = torch.empty(N, dtype=z_a.dtype)
    for i in starts:
        diag[i:i + chunk] = (z_a[i:i + chunk] @ z_v[i:i + chunk].T).diagonal()
    diag -= tol
    a2v = torch.zeros(N, dtype=torch.int32)
    v2a = torch.zeros(N, dtype=torch.int32)
    for i in starts:
        for j in starts:
            tile = z_a[i:i + chunk] @ z_v[j:j + chunk].T  # sim[i:i+chunk, j:j+chunk]
            a2v[i:i + chunk] += (tile >= diag[i:i + chunk, None]).sum(dim=1, dtype=torch.int32)
            v2a[j:j + chunk] += (tile >= diag[None, j:j + chunk]).sum(dim=0, dtype=torch.int32)
    return a2v.long() - 1, v2a.long() - 1


def median_rank(ranks: Tensor) -> float:
    """1-based median rank; with an even number of queries the mean of the two middle ranks (as np.median)."""
    return torch.quantile(ranks.double(), 0.5).item() + 1


def recall_at(ranks: Tensor, ks: list[int]) -> dict[str, float]:
    """R@K in percent and the median rank (1-based) of a set of queries."""
    out = {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}
    out["MedR"] = median_rank(ranks)
    return out


def retrieval_scores(z_a: Tensor, z_v: Tensor, task: Tensor, task_names: list[str], ks: list[int],
                     chunk: int = 2048) -> dict[str, dict[str, dict[str, float]]]:
    """{'a2v'|'v2a': {'all' | task name: {'R@1', 'R@5', 'R@10', 'MedR'}}}, in tiles (bounded memory).

    A->V ranks the rows of sim = z_a @ z_v.T, V->A its columns (method.md §6.1); per task: that task's queries against
    the whole gallery.
    """
    a2v, v2a = pair_ranks(z_a, z_v, chunk)
    ranks = {"a2v": a2v, "v2a": v2a}
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for direction, r in ranks.items():
        scores[direction] = {"all": recall_at(r, ks)}
        for k, name in enumerate(task_names):
            rows = task == k
            if rows.any():
                scores[direction][name] = recall_at(r[rows], ks)
    return scores


# ----------------------------------------------------------------------------------------------------------
# accuracy matrix and summary


def accuracy_matrix(history: list[dict[str, Any]], tasks: list[str], direction: str, metric: str) -> list[list]:
    """a[l][k] from the per-task rows of results/retrieval.json (None where a task has no queries)."""
    return [[row["scores"][direction].get(t, {}).get(metric) for t in tasks] for row in history]


def average_accuracy(a: list[list]) -> float:
    """A = mean over tasks of the final row."""
    final = [x for x in a[-1] if x is not None]
    return sum(final) / len(final)


def forgetting_conventional(a: list[list]) -> float | None:
    """F = 1/(T-1) sum_{k<T} max_{k<=l<T} (a[l][k] - a[T][k]); None for a single task."""
    T = len(a)
    if T < 2:
        return None
    drops = [max(a[l][k] - a[T - 1][k] for l in range(k, T - 1)) for k in range(T - 1)]
    return sum(drops) / (T - 1)


def forgetting_as_coded(a: list[list]) -> float | None:
    """The authors' F (method.md §6.2, B15): every task k <= T, every checkpoint l < T, divided by T-1."""
    T = len(a)
    if T < 2:
        return None
    drops = [max(a[l][k] - a[T - 1][k] for l in range(T - 1)) for k in range(T)]
    return sum(drops) / (T - 1)


def summarize(history: list[dict[str, Any]], tasks: list[str], ks: list[int]) -> dict[str, Any]:
    """A and both F per direction and R@K, plus 'avg' = the mean over K (the paper's tables)."""
    summary: dict[str, Any] = {"tasks": tasks, "trained": [row["after_task"] for row in history]}
    square = len(history) == len(tasks)  # a continual run; a multitask run has one row
    for direction in DIRECTIONS:
        per_k = {}
        for k in ks:
            a = accuracy_matrix(history, tasks, direction, f"R@{k}")
            per_k[f"R@{k}"] = {
                "A": average_accuracy(a),
                "F": forgetting_conventional(a) if square else None,
                "F_as_coded": forgetting_as_coded(a) if square else None,
            }
        per_k["avg"] = {name: _mean_or_none([per_k[f"R@{k}"][name] for k in ks]) for name in ("A", "F", "F_as_coded")}
        summary[direction] = per_k
    return summary


def mean_std(values: list[float]) -> tuple[float, float | None, int] | None:
    """(mean, sample std (ddof 1) or None for one value, n) over seeds; None for no values."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def t_within(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer df >= 1, exactly (Abramowitz & Stegun 26.7.3-26.7.4). With
    θ = atan(t / √df) and c = cos θ:
        odd df:  2/π (θ + sin θ (c + 2/3 c³ + ... + (2·4···(df-3)) / (1·3···(df-2)) c^(df-2)))
        even df: sin θ (1 + 1/2 c² + ... + (1·3···(df-3)) / (2·4···(df-2)) c^(df-2))"""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        term, series = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # powers 1, 3, ..., df - 2
            series += term
            term *= c2 * 2 * k / (2 * k + 1)
        return 2 / math.pi * (theta + s * series)
    term, series = 1.0, 0.0
    for k in range(df // 2):  # powers 0, 2, ..., df - 2
        series += term
        term *= c2 * (2 * k + 1) / (2 * k + 2)
    return s * series


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = level (two-sided), by bisection on t_within: 4.303 for level 0.95 and df 2."""
    lo, hi = 0.0, 1.0
    while t_within(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < level else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float, int] | None:
    """Mean of the paired differences d_i = a_i - b_i (seed i of both) and its t-interval over seeds:
    (mean, low, high, n), mean ± t_{level, n-1} · sd(d) / √n; None for fewer than two pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values against {len(b)}; pair them by seed first")
    if len(a) < 2:
        return None
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    half = t_quantile(level, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, mean - half, mean + half, len(d)


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def summary_table(summary: dict[str, Any]) -> list[list[str]]:
    """Rows of the paper's layout: metric, then A / F / F_as_coded for each direction."""
    header = ["metric"] + [f"{d} {m}" for d in DIRECTIONS for m in ("A", "F", "F_as_coded")]
    rows = [header]
    for metric in [k for k in summary[DIRECTIONS[0]]]:
        row = [metric]
        for d in DIRECTIONS:
            row += [_fmt(summary[d][metric][m]) for m in ("A", "F", "F_as_coded")]
        rows.append(row)
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """{'a2v R@1 A': 12.3, ...}: every number of the summary under one flat name (the report's columns)."""
    out = {}
    for d in DIRECTIONS:
        for metric, values in summary[d].items():
            for name, value in values.items():
                if value is not None:
                    out[f"{d} {metric} {name}"] = value
    return out


def write_table(results_dir: Path, name: str, table: list[list[str]]) -> None:
    """results/<name>.md and results/<name>.csv of a header + rows table of strings."""
    md = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(r) + " |" for r in table[1:]]
    atomic_write_text(results_dir / f"{name}.md", "\n".join(md) + "\n")
    rows = io.StringIO(newline="")
    csv.writer(rows).writerows(table)
    atomic_write_text(results_dir / f"{name}.csv", rows.getvalue())


def write_task_result(results_dir: Path, result: dict[str, Any], table: list[list[str]]) -> Path:
    """results/<task>.{json,md,csv}; result holds at least task, checkpoint, recipe, command, metrics."""
    missing = [k for k in ("task", "checkpoint", "recipe", "command", "metrics") if k not in result]
    if missing:
        raise KeyError(f"result of {result.get('task')!r} lacks {missing}")
    make_dir(results_dir)
    path = results_dir / f"{result['task']}.json"
    atomic_write_text(path, json.dumps(result, indent=1))
    write_table(results_dir, result["task"], table)
    return path


def write_results(results_dir: Path, history: list[dict[str, Any]], tasks: list[str], ks: list[int],
                  provenance: dict[str, Any] | None = None) -> dict:
    """results/retrieval.{json,md,csv} (every row so far, the summary, flat metrics) and summary.{json,md,csv}.

    provenance: {'checkpoint', 'recipe', 'command'} of the result (None where unknown).  Files written atomically.
    """
    make_dir(results_dir)
    summary = summarize(history, tasks, ks)
    table = summary_table(summary)
    result = {"task": "retrieval", **{k: None for k in ("checkpoint", "recipe", "command")}, **(provenance or {}),
              "metrics": flat_metrics(summary), "tasks": tasks, "rows": history, "summary": summary}
    write_task_result(results_dir, result, table)
    atomic_write_text(results_dir / "summary.json", json.dumps(summary, indent=1))
    write_table(results_dir, "summary", table)
    return summary
