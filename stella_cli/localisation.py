"""Localisation diagnostic: does STELLA's patch importance land on what makes the sound? (synthetic benchmark)

STELLA's first idea (method.md §3.2) is that the AVM's cross-attention points at the sounding object in the
frames and at the event in the audio. The synthetic benchmark knows both: the sounding object's box in every frame
and the event window. For each task checkpoint of a STELLA run, on the retrieval clips (evaluation window):

    share_v = Σ_j I_v[j]·o_v[j]    o_v[j] = fraction of video patch j's area inside the box of its frame
    share_a = Σ_j I_a[j]·o_a[j]    o_a[j] = fraction of audio token j's time span inside the event window

with I_v (B, L_V) and I_a (B, L_A) the importance of method.md §3.2 (each sums to 1). A uniform importance scores
mean_j o[j] (the box's share of the frame, the event's share of the fbank): `lift` = share / uniform, 1 = no
localisation. Reported per task (the clips of each task) and over the stream (after every task checkpoint), and
before the stream (`start`) where the run starts from a pre-trained AVM (model.avm.checkpoint, method.md §2.5): the
AVM on its pre-trained backbone (model.checkpoint), as the first step sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stella_cli.data import AVDataset, build_loader
from stella_cli.checkpoint import load_avm_checkpoint, load_backbone, task_of
from stella_cli.downstream import Context, TaskSkipped
from stella_cli.model import AVM, CAVMAE
from stella_cli.scoring import patch_importance


def interval_overlap(lo: Tensor, hi: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Fraction of each cell [lo, hi) inside [a, b]; broadcasting. lo, hi: cell edges; a, b: the window."""
    return ((torch.minimum(hi, b) - torch.maximum(lo, a)).clamp(min=0) / (hi - lo))


def video_overlap(boxes: Tensor, grid: int) -> Tensor:
    """boxes (B, F, 4) x0, y0, x1, y1 in [0, 1] -> (B, F·grid²) fraction of each patch inside its frame's box,
    in token order t·grid² + row·grid + col."""
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    lo, hi = edges[:-1], edges[1:]  # (grid,)
    ox = interval_overlap(lo, hi, boxes[..., 0:1], boxes[..., 2:3])  # (B, F, grid) over columns
    oy = interval_overlap(lo, hi, boxes[..., 1:2], boxes[..., 3:4])  # (B, F, grid) over rows
    return (oy[..., :, None] * ox[..., None, :]).flatten(1)  # (B, F, row, col) -> (B, L_V)


def audio_overlap(events: Tensor, num_time_tokens: int, num_freq_tokens: int, seconds_per_token: float) -> Tensor:
    """events (B, 2) start, end seconds -> (B, L_A) fraction of each token's time span inside the event, in token
    order t·num_freq_tokens + f (every frequency token of a time step alike)."""
    t = torch.arange(num_time_tokens, dtype=torch.float32) * seconds_per_token
    o = interval_overlap(t, t + seconds_per_token, events[:, 0:1], events[:, 1:2])  # (B, T/p)
    return o.repeat_interleave(num_freq_tokens, dim=1)  # (B, L_A)


@torch.no_grad()
def importance_shares(backbone: CAVMAE, avm: AVM, dataset: AVDataset, tau: float, batch_size: int,
                      device: torch.device) -> dict[str, Tensor]:
    """Per clip of `dataset`: share_v, uniform_v, share_a, uniform_a (N,) and task (N,)."""
    p = backbone.patch_size
    seconds_per_token = p * 0.010  # p fbank frames at a 10 ms shift
    loader = build_loader(dataset, batch_size, shuffle=False, seed=0, epoch=0, drop_last=False, num_workers=0)
    frames = dataset.sample_frames(None)  # the evaluation window's cached frame indices (F,)
    out: dict[str, list[Tensor]] = {k: [] for k in ("share_v", "uniform_v", "share_a", "uniform_a", "task")}
    for b in loader:
        idx = b["index"].tolist()
        boxes = torch.from_numpy(np.stack([dataset.boxes(i)[frames] for i in idx]))  # (B, F, 4)
        events = torch.tensor([dataset.event(i) for i in idx], dtype=torch.float32)  # (B, 2)
        e_a, e_v = backbone.joint_codes(*backbone.unimodal_codes(b["audio"].to(device), b["video"].to(device)))
        att = avm.attention_logits(e_a, e_v)
        I_v = patch_importance(att["S_av"], tau).cpu()  # (B, L_V)
        I_a = patch_importance(att["S_va"], tau).cpu()  # (B, L_A)
        o_v = video_overlap(boxes, backbone.grid)
        o_a = audio_overlap(events, backbone.num_time_tokens, backbone.num_freq_tokens, seconds_per_token)
        out["share_v"].append((I_v * o_v).sum(1))
        out["uniform_v"].append(o_v.mean(1))
        out["share_a"].append((I_a * o_a).sum(1))
        out["uniform_a"].append(o_a.mean(1))
        out["task"].append(b["task"])
    return {k: torch.cat(v) for k, v in out.items()}


def summarize_shares(shares: dict[str, Tensor], task_names: list[str]) -> dict[str, dict[str, float]]:
    """{'all' | task: {share_v, uniform_v, lift_v, share_a, uniform_a, lift_a, clips}} (shares in percent)."""
    groups = {"all": torch.ones_like(shares["task"], dtype=torch.bool)}
    groups.update({name: shares["task"] == k for k, name in enumerate(task_names)})
    out = {}
    for name, rows in groups.items():
        if not rows.any():
            continue
        s = {k: 100 * shares[k][rows].double().mean().item() for k in ("share_v", "uniform_v", "share_a", "uniform_a")}
        s["lift_v"], s["lift_a"] = s["share_v"] / s["uniform_v"], s["share_a"] / s["uniform_a"]
        s["clips"] = int(rows.sum())
        out[name] = s
    return out


def starts_pretrained(ctx: Context) -> bool:
    """The run starts from a pre-trained backbone and AVM whose files are still there (else: no `start` row)."""
    m = ctx.target.recipe.model
    if not (m.checkpoint and m.avm.checkpoint):
        return False
    missing = [p for p in (m.checkpoint, m.avm.checkpoint) if not Path(p).is_file()]
    if missing:
        ctx.log(f"localisation: no row before the stream, the start point {missing[0]} is gone")
    return not missing


def score_row(ctx: Context, after: str, source: str, backbone: CAVMAE, avm: AVM,
              dataset: AVDataset) -> dict[str, Any]:
    """One row of the diagnostic: the importance shares of one (backbone, AVM) pair, logged."""
    r = ctx.target.recipe
    shares = importance_shares(backbone, avm.to(ctx.device).eval(), dataset, r.method.stella.att_temperature,
                               r.eval.batch_size, ctx.device)
    row = {"after_task": after, "checkpoint": source, "scores": summarize_shares(shares, dataset.task_names)}
    a = row["scores"]["all"]
    ctx.log(f"localisation {'before the stream' if after == 'start' else 'after ' + after}: video "
            f"{a['share_v']:.1f}% on the object (uniform {a['uniform_v']:.1f}%), audio {a['share_a']:.1f}% in the "
            f"event (uniform {a['uniform_a']:.1f}%)")
    return row


def run_localisation(ctx: Context) -> tuple[dict[str, Any], list[list[str]]]:
    """`stella eval --task localisation`: importance shares after every task checkpoint of a STELLA run."""
    r = ctx.target.recipe
    dataset = AVDataset(r.data, "retrieval", tasks=ctx.all_tasks, train=False, seed=r.train.seed)
    if dataset.boxes(0) is None or dataset.event(0) is None:
        raise TaskSkipped(f"{r.data.root}: localisation needs the sounding-object boxes and event windows of the "
                          "synthetic benchmark")
    rows, start = [], None
    for path in ctx.target.checkpoints:
        loaded = ctx.load(path)
        avm_state = loaded.avm_state()
        if not avm_state:
            raise TaskSkipped(f"{path}: no AVM in the checkpoint (method {r.method.name!r}); localisation scores "
                              "STELLA's patch importance")
        avm = AVM(loaded.backbone.embed_dim, r.model.avm.num_heads, r.model.avm.fix_head_reshape)
        avm.load_state_dict(avm_state)
        if start is None and starts_pretrained(ctx):  # before the stream: the start point
            start_backbone = load_backbone(Path(r.model.checkpoint), r, ctx.device).backbone
            start_avm = AVM(start_backbone.embed_dim, r.model.avm.num_heads, r.model.avm.fix_head_reshape)
            load_avm_checkpoint(start_avm, r.model.avm.checkpoint)
            start = score_row(ctx, "start", r.model.avm.checkpoint, start_backbone, start_avm, dataset)
            rows.append(start)
        rows.append(score_row(ctx, task_of(path), str(path), loaded.backbone, avm, dataset))
    stream_rows = [row for row in rows if row is not start]
    final = rows[-1]["scores"]["all"]
    stream = {k: sum(row["scores"]["all"][k] for row in stream_rows) / len(stream_rows) for k in ("lift_v", "lift_a")}
    metrics = {f"{k}": final[k] for k in ("share_v", "uniform_v", "lift_v", "share_a", "uniform_a", "lift_a")}
    metrics.update({f"stream mean {k}": v for k, v in stream.items()})
    if start is not None:
        metrics.update({f"start {k}": start["scores"]["all"][k] for k in ("share_v", "lift_v", "share_a", "lift_a")})
    for name, s in rows[-1]["scores"].items():
        if name != "all":
            metrics[f"lift_v {name}"], metrics[f"lift_a {name}"] = s["lift_v"], s["lift_a"]
    table = [["after task (clips)", "n", "video %", "uniform", "lift", "audio %", "uniform", "lift"]]
    for row in rows:
        for name, s in row["scores"].items():
            if name == "all" or row is rows[-1]:
                label = row["after_task"] + ("" if name == "all" else f" ({name})")
                table.append([label, str(s["clips"]), f"{s['share_v']:.2f}", f"{s['uniform_v']:.2f}",
                              f"{s['lift_v']:.2f}", f"{s['share_a']:.2f}", f"{s['uniform_a']:.2f}",
                              f"{s['lift_a']:.2f}"])
    return {"metrics": metrics, "rows": rows, "stream_mean": stream}, table
