"""PNG figures of runs, reports and replay buffers (matplotlib, Agg backend: no display needed).

    accuracy_heatmap   a(l, k) = R@K avg of task k after training task l, per direction, values annotated
    stream_plot        a(l, k) of each task over the stream: the forgetting picture
    loss_curves        every loss term over the optimiser steps (metrics.jsonl), task boundaries marked
    comparison_bars    A and F per method (a `stella report` table), seed std as error bars
    paired_plot        STELLA / STELLA+ minus each baseline, paired by seed: mean and 95% t-interval
    bench_bars         time per iteration and memory per method (`stella bench --json`)
    buffer_clip_figure one stored clip: frames and fbank, stored importance, pruning probability, core patches
    buffer_composition clips per task in the buffer after each task of the stream

One style for all (`STYLE`); task colours come from one qualitative map so a task has the same colour in every
figure. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import torch  # noqa: E402

from stella_cli.cache import read_meta  # noqa: E402
from stella_cli.checkpoint import read_checkpoint, task_checkpoints, task_of  # noqa: E402
from stella_cli.config import load_recipe, num_core_tokens, token_counts  # noqa: E402
from stella_cli.errors import StellaError  # noqa: E402
from stella_cli.evaluate import DIRECTIONS, accuracy_matrix  # noqa: E402
from stella_cli.files import replacing  # noqa: E402
from stella_cli.select import prune_mask, select_audio_chunks, select_video_patches  # noqa: E402
from stella_cli.tracking import METRICS, read_metrics  # noqa: E402

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 100, "savefig.bbox": "tight", "font.size": 9, "axes.titlesize": 10,
    "axes.labelsize": 9, "figure.titlesize": 11, "legend.fontsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": False, "grid.alpha": 0.3, "image.interpolation": "nearest",
}
DIRECTION_TITLES = {"a2v": "audio → video", "v2a": "video → audio"}
HEAT = "viridis"  # accuracies
IMPORTANCE = "inferno"  # stored importance I (overlay)
PROBABILITY = "Blues"  # pruning probability p in [0, 1]
CORE_EDGE = "#00e5ff"  # outline of the core patches
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
FBANK_SHIFT_S = 0.01  # Kaldi fbank frame shift (10 ms)
LOSS_TITLES = {"loss": "total", "loss_mae_a": "audio MAE", "loss_mae_v": "video MAE", "loss_con": "contrastive",
               "loss_vam": "AVM matching", "loss_pen": "replay penalty"}  # README "Watching a run" says what each is


def task_color(k: int) -> Any:
    return plt.get_cmap("tab10")(k % 10)


def _save(fig: plt.Figure, out: Path) -> Path:
    """Write the figure atomically (files.replacing: a full disk leaves no half PNG), then close it."""
    try:
        with replacing(out) as fh:
            fig.savefig(fh, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------------
# one run: accuracy matrix and the stream


def avg_matrix(retrieval: dict[str, Any], direction: str) -> np.ndarray:
    """(rows trained so far, tasks) R@K averaged over K (NaN where a task has no queries)."""
    rows, tasks = retrieval["rows"], retrieval["tasks"]
    metrics = list(dict.fromkeys(m for entry in rows[0]["scores"][direction].values() for m in entry
                                 if m.startswith("R@")))  # R@1, R@5, R@10 (eval.recall_at)
    mats = [np.array(accuracy_matrix(rows, tasks, direction, m), dtype=float) for m in metrics]
    return np.mean(mats, axis=0)


def accuracy_heatmap(retrieval: dict[str, Any], out: Path, title: str = "") -> Path:
    """Task learnt (rows) x task evaluated (columns) for both directions; the diagonal (just learnt) outlined."""
    tasks, trained = retrieval["tasks"], [r["after_task"] for r in retrieval["rows"]]
    mats = {d: avg_matrix(retrieval, d) for d in DIRECTIONS}
    vmax = max(10.0, float(np.ceil(np.nanmax([np.nanmax(m) for m in mats.values()]) / 10) * 10))
    with plt.rc_context(STYLE):
        w = 1.0 + 0.55 * len(tasks)
        h = max(2.6, 0.5 * len(trained) + 1.6)  # a Multitask run has one row
        fig, axes = plt.subplots(1, 2, figsize=(2 * w + 1.2, h), constrained_layout=True)
        for ax, d in zip(axes, DIRECTIONS):
            m = mats[d]
            im = ax.imshow(m, cmap=HEAT, vmin=0, vmax=vmax, aspect="auto")
            for l in range(m.shape[0]):
                for k in range(m.shape[1]):
                    if np.isfinite(m[l, k]):
                        dark = m[l, k] < 0.6 * vmax
                        ax.text(k, l, f"{m[l, k]:.1f}", ha="center", va="center", fontsize=8,
                                color="white" if dark else "black")
                if trained[l] in tasks:
                    k = tasks.index(trained[l])
                    ax.add_patch(Rectangle((k - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="white", lw=1.8))
            ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
            ax.set_yticks(range(len(trained)), trained)
            ax.set_xlabel("task evaluated")
            ax.set_ylabel("after training task")
            ax.set_title(DIRECTION_TITLES[d])
        fig.colorbar(im, ax=axes, shrink=0.9, label="R@K avg (%)")
        fig.suptitle(title or "accuracy matrix a(l, k): retrieval of each task after each task learnt")
        return _save(fig, out)


def stream_plot(retrieval: dict[str, Any], out: Path, title: str = "") -> Path:
    """a(l, k) over l for every task k: dashed before task k is learnt, solid after; black = mean over tasks."""
    tasks, trained = retrieval["tasks"], [r["after_task"] for r in retrieval["rows"]]
    x = np.arange(len(trained))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True, constrained_layout=True)
        top = 0.0
        for ax, d in zip(axes, DIRECTIONS):
            m = avg_matrix(retrieval, d)
            for k, task in enumerate(tasks):
                learnt = trained.index(task) if task in trained else 0
                color = task_color(k)
                if learnt > 0:
                    ax.plot(x[:learnt + 1], m[:learnt + 1, k], color=color, ls=":", lw=1.2)
                ax.plot(x[learnt:], m[learnt:, k], color=color, lw=1.8, marker="o", ms=3.5, label=task)
                if task in trained:
                    ax.plot(x[learnt], m[learnt, k], color=color, marker="o", ms=7, mec="black", mew=0.8)
            ax.plot(x, np.nanmean(m, axis=1), color="black", lw=2.4, marker="s", ms=4, label="mean over tasks")
            top = max(top, float(np.nanmax(m)))
            ax.set_xticks(x, trained, rotation=30, ha="right")
            ax.set_xlabel("after training task")
            ax.set_title(DIRECTION_TITLES[d])
            ax.grid(True, axis="y")
        axes[0].set_ylabel("R@K avg (%)")
        axes[0].set_ylim(0, max(10.0, top * 1.12))
        axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                       title="task (big dot: just learnt;\ndotted: not yet learnt)", title_fontsize=8)
        fig.suptitle(title or "retrieval of each task over the stream")
        return _save(fig, out)


def loss_series(records: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray], list[tuple[str, int, int]]]:
    """The training lines of metrics.jsonl as arrays: steps (N,), each loss key's values (N,), NaN where a line
    lacks the term (a replay term before the buffer fills), total first; and the tasks as (name, first, last step)
    in stream order."""
    lines = [r for r in records if "loss" in r and r.get("event") is None]
    steps = np.array([r["step"] for r in lines], dtype=float)
    keys = ["loss"] + list(dict.fromkeys(k for r in lines for k in r if k.startswith("loss_")))
    values = {k: np.array([r.get(k, np.nan) for r in lines], dtype=float) for k in keys}
    tasks: list[tuple[str, int, int]] = []
    for r in lines:
        if tasks and tasks[-1][0] == r["task"]:
            tasks[-1] = (r["task"], tasks[-1][1], r["step"])
        else:
            tasks.append((r["task"], r["step"], r["step"]))
    return steps, values, tasks


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over `window` logged points (NaN-aware; the ends average what they have)."""
    if window <= 1:
        return values
    ok = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(float), kernel, mode="same")
    return np.where(ok, sums / np.maximum(counts, 1), np.nan)


def loss_curves(records: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """One panel per loss key of the training lines (total first) over the optimiser steps, each task's stretch in
    its colour with a dashed line at every task boundary; beyond 60 logged points the raw values are drawn thin and
    a moving average over 1/30 of them thick. None when there are no training lines."""
    steps, values, tasks = loss_series(records)
    if not len(steps):
        return None
    window = len(steps) // 30 if len(steps) > 60 else 1
    pad = max(0.5, 0.02 * (steps[-1] - steps[0]))
    cols = min(3, len(values))
    rows = -(-len(values) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.4, 2.8 * rows + 0.6), squeeze=False,
                                 constrained_layout=True)
        for ax, (key, y) in zip(axes.flat, values.items()):
            for k, (task, first, last) in enumerate(tasks):
                part = (steps >= first) & (steps <= last)  # averaged within the task: a jump at a boundary stays
                if window > 1:
                    ax.plot(steps[part], y[part], color=task_color(k), lw=0.6, alpha=0.35)
                ax.plot(steps[part], moving_average(y[part], window), color=task_color(k), lw=1.6,
                        marker="o" if part.sum() < 30 else None, ms=3, label=task)
            for (_, _, last), (_, first, _) in zip(tasks, tasks[1:]):
                ax.axvline((last + first) / 2, color="0.4", ls="--", lw=0.9)
            ax.set_xlim(steps[0] - pad, steps[-1] + pad)  # the same steps in every panel
            ax.set_title(f"{key}: {LOSS_TITLES.get(key, 'loss term')}")
            ax.set_xlabel("optimiser step")
            ax.grid(True, axis="y")
        for ax in axes.flat[len(values):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", frameon=False, title="task\n(dashed: boundary)",
                   title_fontsize=8)
        smoothing = f"; thick: moving average of {window} logged points" if window > 1 else ""
        fig.suptitle(f"{title} (every logged step{smoothing})")
        return _save(fig, out)


def plot_run(run_dir: Path, out_dir: Path | None = None, prefix: str = "") -> list[Path]:
    """The heatmap and the stream plot of one run (once it has retrieval results) and its loss curves (once it has
    logged a training line), in out_dir (default: RUN/plots/)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    name = run_dir.name
    written = []
    path = run_dir / "results" / "retrieval.json"
    retrieval = json.loads(path.read_text()) if path.is_file() else {}
    if retrieval.get("rows"):
        written += [accuracy_heatmap(retrieval, out_dir / f"{prefix}accuracy_matrix.png",
                                     f"{name}: accuracy matrix, R@K avg"),
                    stream_plot(retrieval, out_dir / f"{prefix}stream.png",
                                f"{name}: retrieval of each task over the stream")]
    losses = loss_curves(read_metrics(run_dir / METRICS), out_dir / f"{prefix}losses.png", f"{name}: loss terms")
    return written + ([losses] if losses else [])


# ----------------------------------------------------------------------------------------------------------
# reports: method comparison and benchmark bars


def comparison_bars(labels: list[str], series: dict[str, tuple[list[float], list[float]]], out: Path,
                    panels: list[tuple[str, list[str], str]], title: str) -> Path:
    """Grouped bars. series: name -> (means, stds) per label (NaN = missing); panels: (title, series, y label)."""
    with plt.rc_context(STYLE):
        width = max(6.0, 0.75 * len(labels) * len(panels) + 2)
        fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.8), constrained_layout=True, squeeze=False)
        x = np.arange(len(labels))
        for ax, (panel_title, names, ylabel) in zip(axes[0], panels):
            bar_w = 0.8 / len(names)
            for j, name in enumerate(names):
                means, stds = (np.array(v, dtype=float) for v in series[name])
                pos = x - 0.4 + bar_w * (j + 0.5)
                ax.bar(pos, np.nan_to_num(means), bar_w, color=plt.get_cmap("tab10")(j), label=name)
                spread = np.isfinite(means) & (np.nan_to_num(stds) > 0)  # n = 1: no error bar
                ax.errorbar(pos[spread], means[spread], yerr=stds[spread], fmt="none", ecolor="black", capsize=3,
                            lw=1)
                for p_, m_ in zip(pos, means):
                    if not np.isfinite(m_):
                        ax.text(p_, 0, "n/a", ha="center", va="bottom", fontsize=7, color="0.4")
            ax.axhline(0, color="0.3", lw=0.8)
            ax.set_xticks(x, labels, rotation=30, ha="right")
            ax.set_title(panel_title)
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y")
            ax.legend(frameon=False)
        fig.suptitle(title)
        return _save(fig, out)


def report_bars(table, out: Path) -> Path | None:
    """A and F (R@K avg) of each row of a retrieval/ablation `report.Table`, per direction; seed std as error."""
    cols = {name: [c for c in table.columns if c.endswith(f" avg {name}")] for name in ("A", "F")}
    if not cols["A"]:
        return None
    labels = [g.label for g in table.groups]
    series = {}
    for name, columns in cols.items():
        for col in columns:
            stats = [table.stat(i, col) for i in range(len(labels))]
            series[col] = ([s[0] if s else np.nan for s in stats], [s[1] or 0.0 if s else 0.0 for s in stats])
    panels = [("average accuracy A (higher is better)", cols["A"], "R@K avg (%)"),
              ("forgetting F (lower is better)", cols["F"], "R@K avg (%)")]
    seeds = sorted({len(g.runs) for g in table.groups})
    return comparison_bars(labels, series, out, panels, f"{table.name}: mean over seeds (n = "
                           f"{', '.join(map(str, seeds))}), error bars = sample std")


def paired_plot(paired: list, out: Path) -> Path:
    """The paired differences of `stella report` (report.Paired: STELLA / STELLA+ - each baseline): one panel per
    avg column, one line per comparison, the mean as a dot and the 95% t-interval as a bar; the column's best
    baseline in black, the others in grey; 0 (no difference) as a vertical line."""
    columns = list(dict.fromkeys(p.column for p in paired))
    labels = list(dict.fromkeys(f"{p.row} - {p.against}" for p in paired))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(columns), figsize=(3.0 * len(columns) + 2.5, max(2.8, 0.3 * len(labels) + 1.6)),
                                 sharey=True, constrained_layout=True, squeeze=False)
        y = {label: i for i, label in enumerate(reversed(labels))}
        for ax, col in zip(axes[0], columns):
            for p in (p for p in paired if p.column == col):
                colour = "black" if p.best else "0.6"
                yy = y[f"{p.row} - {p.against}"]
                ax.plot([p.low, p.high], [yy, yy], color=colour, lw=1.5 if p.best else 1)
                ax.plot(p.mean, yy, "o", color=colour, ms=4)
            ax.axvline(0, color="tab:red", lw=0.8)
            better = "< 0: forgets less" if col.endswith(" F") else "> 0: higher"
            ax.set_title(f"{col}\n({better})")
            ax.set_xlabel("difference (points)")
            ax.grid(True, axis="x")
        axes[0][0].set_yticks(list(y.values()), list(y))
        n = sorted({p.n for p in paired})
        fig.suptitle(f"paired differences over seeds (n = {', '.join(map(str, n))}): mean and 95% t-interval; "
                     "black = the column's best baseline")
        return _save(fig, out)


def bench_bars(table, out: Path) -> Path:
    """Time per iteration and memory of each row of an efficiency `report.Table`."""
    labels = [g.label for g in table.groups]
    series = {}
    for col in ("iter (s)", "activation (MiB)", "peak (MiB)"):
        stats = [table.stat(i, col) for i in range(len(labels))]
        series[col] = ([s[0] if s else np.nan for s in stats], [s[1] or 0.0 if s else 0.0 for s in stats])
    panels = [("time per iteration", ["iter (s)"], "seconds"),
              ("memory", ["activation (MiB)", "peak (MiB)"], "MiB")]
    return comparison_bars(labels, series, out, panels, "efficiency (stella bench): lower is better")


# ----------------------------------------------------------------------------------------------------------
# replay buffer


def unnormalize_video(video: np.ndarray) -> np.ndarray:
    """(F, 3, S, S) ImageNet-normalised -> (F, S, S, 3) RGB in [0, 1] (undoes data.normalize_video)."""
    rgb = video.transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(rgb, 0.0, 1.0)


def heat_overlay(values: np.ndarray, cmap: str, low: float, high: float) -> np.ndarray:
    """RGBA image of `values`, transparent at or below `low` and more opaque towards `high`: the picture stays
    visible where importance is low (callers pass low = the clip's median, so the upper half is coloured)."""
    x = np.clip((values - low) / ((high - low) or 1.0), 0.0, 1.0)
    rgba = plt.get_cmap(cmap)(x)
    rgba[..., 3] = 0.75 * x
    return rgba


def _token_grid(values: np.ndarray, F: int, g: int) -> np.ndarray:
    """Video token values (L_V,) in token order t·g² + row·g + col -> (F, g, g)."""
    return values.reshape(F, g, g)


def _audio_grid(values: np.ndarray, n_time: int, n_freq: int) -> np.ndarray:
    """Audio token values (L_A,) in time-major order t·F + f -> (n_freq, n_time), frequency upwards."""
    return values.reshape(n_time, n_freq).T


def _outline_video(ax, tokens: np.ndarray, frame: int, g: int, p: int) -> None:
    for idx in tokens:
        t, rest = divmod(int(idx), g * g)
        if t == frame:
            row, col = divmod(rest, g)
            ax.add_patch(Rectangle((col * p - 0.5, row * p - 0.5), p, p, fill=False, edgecolor=CORE_EDGE, lw=0.9))


def _outline_audio(ax, tokens: np.ndarray, n_freq: int, p: int) -> None:
    for idx in tokens:
        t, f = divmod(int(idx), n_freq)
        ax.add_patch(Rectangle((t * p * FBANK_SHIFT_S, f * p), p * FBANK_SHIFT_S, p, fill=False,
                               edgecolor=CORE_EDGE, lw=0.5))


def buffer_clip_figure(clip: dict[str, np.ndarray], geometry: dict[str, Any], out: Path, title: str) -> Path:
    """One stored clip. clip: the slot's fields as numpy arrays; geometry: F, S, p, T, M, fbank mean/std and
    `core_v` / `core_a` token indices of the core patches (a replay draw for STELLA, stored for STELLA+).

    STELLA (full clip stored): frames with I_v as a heat overlay and the core patches outlined, p_v per patch,
    the fbank with I_a and the core outlined, and p_a. STELLA+ (core patches stored): the stored patches in
    place, the rest blank. A method storing only full clips: frames and fbank.
    """
    F, S, p, T, M = (geometry[k] for k in ("F", "S", "p", "T", "M"))
    g, n_time, n_freq = S // p, T // p, M // p
    plus = "core_v" in clip
    has_I, has_p = "I_v" in clip, "p_v" in clip
    video_rows = 1 + has_p
    audio_rows = 1 + has_p
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(2.3 * F + 1.4, 2.3 * video_rows + 2.0 * audio_rows + 0.6), constrained_layout=True)
        grid = fig.add_gridspec(video_rows + audio_rows, F + 1, width_ratios=[1] * F + [0.06],
                                height_ratios=[1.15] * video_rows + [1] * audio_rows)
        # video
        if plus:
            frames = np.zeros((F, S, S, 4), dtype=np.float32)  # RGBA, alpha 0 = not stored
            patches = clip["core_v"].transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN  # (K_V, p, p, 3)
            for idx, patch in zip(geometry["core_v"], patches):
                t, rest = divmod(int(idx), g * g)
                row, col = divmod(rest, g)
                frames[t, row * p:(row + 1) * p, col * p:(col + 1) * p, :3] = np.clip(patch, 0, 1)
                frames[t, row * p:(row + 1) * p, col * p:(col + 1) * p, 3] = 1.0
        else:
            frames = unnormalize_video(clip["video"])
        heat = _token_grid(clip["I_v"], F, g) if has_I else None
        heat_range = (float(np.median(heat)), float(heat.max())) if has_I else None
        for t in range(F):
            ax = fig.add_subplot(grid[0, t])
            ax.set_facecolor("0.85")
            ax.imshow(frames[t])
            if heat is not None:
                ax.imshow(heat_overlay(np.kron(heat[t], np.ones((p, p))), IMPORTANCE, *heat_range))
            if geometry.get("core_v") is not None and not plus:
                _outline_video(ax, geometry["core_v"], t, g, p)
            ax.set_title(f"frame {t + 1}")
            ax.set_xticks([])
            ax.set_yticks([])
        if heat is not None:
            scale = plt.cm.ScalarMappable(plt.Normalize(*heat_range), IMPORTANCE)
            fig.colorbar(scale, cax=fig.add_subplot(grid[0, F]), label="importance I_v (overlay\nabove the median)")
        if has_p:
            pv = _token_grid(clip["p_v"], F, g)
            for t in range(F):
                ax = fig.add_subplot(grid[1, t])
                im_p = ax.imshow(pv[t], cmap=PROBABILITY, vmin=0, vmax=1, extent=(-0.5, S - 0.5, S - 0.5, -0.5))
                _outline_video(ax, geometry["core_v"], t, g, p)
                ax.set_title(f"pruning prob. p_v, frame {t + 1}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
            fig.colorbar(im_p, cax=fig.add_subplot(grid[1, F]), label="p_v")
        # audio
        extent = (0, T * FBANK_SHIFT_S, 0, M)
        ax = fig.add_subplot(grid[video_rows, :F])
        ax.set_facecolor("0.85")
        if plus:
            spec = np.full((n_freq * p, n_time * p), np.nan, dtype=np.float32)  # (M, T), blank = NaN
            for idx, patch in zip(geometry["core_a"], clip["core_a"][:, 0]):
                t, f = divmod(int(idx), n_freq)
                spec[f * p:(f + 1) * p, t * p:(t + 1) * p] = patch.T  # patch (time, freq) -> (freq, time)
        else:
            spec = clip["audio"][0].T  # (M, T)
        spec = spec * geometry["fbank_std"] + geometry["fbank_mean"]  # back to log-mel energy
        im_s = ax.imshow(spec, origin="lower", aspect="auto", extent=extent, cmap="magma")
        if has_I:
            I_a = _audio_grid(clip["I_a"], n_time, n_freq)
            ax.imshow(heat_overlay(I_a, "Greens", float(np.median(I_a)), float(I_a.max())), origin="lower",
                      aspect="auto", extent=extent)
        if geometry.get("core_a") is not None and not plus:
            _outline_audio(ax, geometry["core_a"], n_freq, p)
        what = "stored core patches in place (rest not stored)" if plus else \
            "fbank" + (", importance I_a above its median (green)" if has_I else "") + \
            (", core patches outlined" if geometry.get("core_a") is not None else "")
        ax.set_title(f"audio: {what}")
        ax.set_ylabel("mel bin")
        ax.set_xlabel("time (s)")
        fig.colorbar(im_s, cax=fig.add_subplot(grid[video_rows, F]), label="log-mel")
        if has_p:
            ax = fig.add_subplot(grid[video_rows + 1, :F])
            im_p = ax.imshow(_audio_grid(clip["p_a"], n_time, n_freq), origin="lower", aspect="auto",
                             extent=extent, cmap=PROBABILITY, vmin=0, vmax=1)
            _outline_audio(ax, geometry["core_a"], n_freq, p)
            ax.set_title("audio pruning probability p_a (core patches outlined)")
            ax.set_ylabel("mel bin")
            ax.set_xlabel("time (s)")
            fig.colorbar(im_p, cax=fig.add_subplot(grid[video_rows + 1, F]), label="p_a")
        fig.suptitle(title)
        return _save(fig, out)


def buffer_composition(counts: list[tuple[str, list[int]]], tasks: list[str], out: Path, capacity: int) -> Path:
    """Stacked bars: clips of each task in the buffer after each checkpoint. counts: (checkpoint label, per task)."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(counts) + 2.5), 3.6), constrained_layout=True)
        x = np.arange(len(counts))
        bottom = np.zeros(len(counts))
        for k, task in enumerate(tasks):
            height = np.array([c[1][k] if k < len(c[1]) else 0 for c in counts], dtype=float)
            ax.bar(x, height, 0.7, bottom=bottom, color=task_color(k), label=task)
            bottom += height
        ax.axhline(capacity, color="0.3", ls="--", lw=1)
        ax.text(x[-1] + 0.4, capacity, f"capacity {capacity}", ha="right", va="bottom", fontsize=8, color="0.3")
        ax.set_xticks(x, [c[0] for c in counts], rotation=30, ha="right")
        ax.set_xlabel("after training task")
        ax.set_ylabel("clips in the buffer")
        ax.set_ylim(0, capacity * 1.12)
        ax.legend(title="stored task", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        ax.set_title("replay buffer composition over the stream")
        return _save(fig, out)


def replay_core(clip: dict[str, np.ndarray], K_V: int, K_A: int, n_freq: int, chunk_times: int,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The core token indices a replay of this STELLA slot would select: z ~ Bernoulli(stored p), then video
    sampling ∝ I·(1−z) and audio chunks (select.py, as in training), one draw from a generator seeded `seed`."""
    gen = torch.Generator().manual_seed(seed)
    I_v, I_a = torch.from_numpy(clip["I_v"])[None], torch.from_numpy(clip["I_a"])[None]  # (1, L_V), (1, L_A)
    z_v = prune_mask(torch.from_numpy(clip["p_v"])[None], gen)
    order_v = select_video_patches(I_v, z_v, K_V, gen)[0, :K_V]
    z_a = prune_mask(torch.from_numpy(clip["p_a"])[None], gen)
    order_a = select_audio_chunks(I_a, z_a, K_A, n_freq, chunk_times, gen)[0, :K_A]
    return order_v.numpy(), order_a.numpy()


def pick_slots(task: np.ndarray | None, filled: int, n: int) -> list[int]:
    """n slots spread over the buffer, ordered by stored task so that every task present is shown."""
    order = np.argsort(task, kind="stable") if task is not None else np.arange(filled)
    n = min(n, filled)
    return [int(order[i]) for i in np.linspace(0, filled - 1, n).round().astype(int)] if n else []


def buffer_figures(run_dir: Path, n: int, out_dir: Path | None = None, checkpoint: str = "latest.pt",
                   buffer: dict | None = None) -> list[Path]:
    """`stella buffer RUN --show N`: N clip figures from `checkpoint` and the composition over the stream
    (each task checkpoint's buffer, or `checkpoint` alone when there are none). Default out: RUN/plots/buffer.
    `buffer`: that checkpoint's buffer when the caller has read it already (`stella buffer` has)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "plots" / "buffer"
    recipe = load_recipe(run_dir / "config.yaml")
    d, s, p = recipe.data, recipe.method.stella, recipe.model.patch_size
    try:
        tasks = read_meta(Path(d.root))["tasks"]
    except StellaError:
        tasks = []

    def load_buffer(path: Path) -> dict:
        state = read_checkpoint(path, mmap=True)
        if "buffer" not in state["method_extra"]:
            raise StellaError(f"{path}: method {state['recipe']['method']['name']!r} keeps no replay buffer")
        return state["method_extra"]["buffer"]

    path = run_dir / "checkpoints" / checkpoint
    if not path.is_file():
        raise StellaError(f"{path}: no such checkpoint")
    if buffer is None:
        buffer = load_buffer(path)
    fields = {k: v.numpy() if v.dtype != torch.bfloat16 else v.float().numpy() for k, v in buffer["fields"].items()}
    filled = next(iter(fields.values())).shape[0] if fields else 0
    task = fields.get("task")
    names = tasks if task is None or not len(task) or task.max() < len(tasks) else \
        [str(i) for i in range(int(task.max()) + 1)]
    L_V, L_A = token_counts(d.num_frames, d.image_size, d.target_length, d.num_mel_bins, p)
    K_V, K_A = num_core_tokens(L_V, s.core_video_ratio), num_core_tokens(L_A, s.core_audio_ratio)
    n_freq = d.num_mel_bins // p
    geometry = dict(F=d.num_frames, S=d.image_size, p=p, T=d.target_length, M=d.num_mel_bins,
                    fbank_mean=d.fbank_mean, fbank_std=d.fbank_std)
    written = []
    if ("video" not in fields or "audio" not in fields) and "core_v" not in fields:
        n = 0  # nothing visual stored (e.g. a buffer of embeddings only)
    for slot in pick_slots(task, filled, n):
        clip = {k: v[slot] for k, v in fields.items()}
        if "core_v" in clip:  # STELLA+: the stored orderings' first K entries are the stored patches
            core = {"core_v": clip["order_v"][:K_V], "core_a": clip["order_a"][:K_A]}
            how = "STELLA+: stored core patches"
        elif {"I_v", "p_v", "I_a", "p_a"} <= clip.keys():
            core_v, core_a = replay_core(clip, K_V, K_A, n_freq, s.num_core_audio_times)
            core = {"core_v": core_v, "core_a": core_a}
            how = "core = one replay draw from the stored p and I (seed 0)"
        else:
            core, how = {}, "full clip"
        tag = f"from {names[int(clip['task'])]}" if task is not None and names else "task unknown"
        extra = f", class {int(clip['label'])}" if "label" in clip else ""
        title = f"{run_dir.name}, slot {slot}: {tag}{extra} ({how})"
        written.append(buffer_clip_figure(clip, {**geometry, **core}, out_dir / f"clip_slot{slot:04d}.png", title))
    if task is not None:
        checkpoints = task_checkpoints(run_dir) or [path]
        counts = []
        for ckpt in checkpoints:
            stored = load_buffer(ckpt)["fields"].get("task")
            per_task = np.bincount(stored.numpy(), minlength=len(names)).tolist() if stored is not None else []
            counts.append((task_of(ckpt), per_task))
        written.append(buffer_composition(counts, names, out_dir / "composition.png", int(buffer["capacity"])))
    return written
