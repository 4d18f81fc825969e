"""Audio-visual event localisation (AVE; method.md §6.3): a segment classifier on the frozen backbone.

Each video is cut into one-second segments (10 for AVE's 10 s videos, 4 for the synthetic 4 s clips). Segment s
gets `num_frames` frames at fps / num_frames stride inside second s (4 frames at 4 fps, as the authors extract them)
and the fbank rows of that second (100 at a 10 ms shift), zero-padded symmetrically in the un-normalised log-mel
domain to the model's `target_length` (the authors' AVE_Wav2fbank pads the 1 s fbank the same way; we slice the
whole clip's fbank instead of recomputing it on the 1 s waveform, which differs only in the edge frames).
Label of segment s: the video's event category when the event covers at least half of [s, s+1), else background.

The authors' release has no AVE head or metric. Ours, stated here as a design choice: the segment's joint-pass
features [mean audio; mean video] (CAVMAE.joint_embed, 2D) -> the authors' Classifier (the same head as the
classification probe) -> C + 1 classes (C categories + background), trained with CE on every segment, AdamW
lr 1e-3, wd 5e-6, 15 epochs, batch 12 videos, 2 warm-up epochs then cosine. The backbone is frozen and unaugmented,
so the features are computed once. Metric: segment accuracy (correct segments / all test segments), as AVE
papers report it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stella_cli.config import DataConfig, HeadConfig
from stella_cli.data import AVDataset, build_loader, frame_indices
from stella_cli.cache import read_meta
from stella_cli.downstream import (FBANK_FRAMES_PER_SECOND, Context, TaskSkipped, epoch_logger, feature_batches, fit,
                                   joint_features, pad_segment)
from stella_cli.model import CAVMAE, Classifier

def segment_labels(event: tuple[float, float] | None, num_segments: int, label: int, background: int) -> Tensor:
    """(num_segments,) long: `label` where the event covers >= half of second [s, s+1), else `background`."""
    s = torch.arange(num_segments, dtype=torch.float64)
    if event is None:
        return torch.full((num_segments,), background, dtype=torch.long)
    covered = (torch.minimum(s + 1, torch.tensor(event[1])) - torch.maximum(s, torch.tensor(event[0]))).clamp(min=0)
    return torch.where(covered >= 0.5, label, background).long()


def segment_accuracy(pred: Tensor, labels: Tensor) -> float:
    """Percent of segments whose predicted class equals the label (background included)."""
    return 100.0 * (pred == labels).double().mean().item()


class SegmentDataset(AVDataset):
    """Items: video (S, F, 3, H, W), audio (S, 1, T, M) of the S one-second segments, segment labels (S,)."""

    def __init__(self, cfg: DataConfig, split: str, seed: int):
        super().__init__(cfg, split, train=False, seed=seed)
        self.num_segments = int(self.spec.clip_seconds)
        self.background = len(self.meta["classes"])
        self.stride = max(int(round(self.spec.fps / cfg.num_frames)), 1)
        self._frames: np.ndarray | None = None

    def sample_frames(self, generator: torch.Generator | None) -> np.ndarray:
        return self._frames if self._frames is not None else super().sample_frames(generator)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rec = self.records[index]
        c, fps = self.cfg, self.spec.fps
        fbank = self.reader.fbank(rec["row"])  # (T, M) un-normalised
        videos, audios = [], []
        for s in range(self.num_segments):
            self._frames = np.minimum(frame_indices(int(s * fps), c.num_frames, self.stride), self.spec.num_frames - 1)
            videos.append(self.load_video(rec["row"], None))
            part = pad_segment(fbank[s * FBANK_FRAMES_PER_SECOND:(s + 1) * FBANK_FRAMES_PER_SECOND], c.target_length)
            audios.append(torch.from_numpy((part - np.float32(c.fbank_mean)) / np.float32(c.fbank_std)).unsqueeze(0))
        self._frames = None
        return {"video": torch.stack(videos), "audio": torch.stack(audios).float(),
                "label": segment_labels(self.event(index), self.num_segments, rec["label"], self.background),
                "task": self.tasks[index]}


@torch.no_grad()
def segment_features(backbone: CAVMAE, dataset: SegmentDataset, batch_size: int,
                     amp: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    """(N, S, 2D) joint features, (N, S) labels, (N,) task of every video."""
    loader = build_loader(dataset, max(batch_size // dataset.num_segments, 1), shuffle=False, seed=0, epoch=0,
                          drop_last=False, num_workers=0)
    feats, labels, tasks = [], [], []
    for b in loader:
        B, S = b["label"].shape
        x = joint_features(backbone, b["audio"].flatten(0, 1), b["video"].flatten(0, 1), amp)  # (B·S, 2D)
        feats.append(x.cpu().reshape(B, S, -1))
        labels.append(b["label"])
        tasks.append(b["task"])
    return torch.cat(feats), torch.cat(labels), torch.cat(tasks)


def train_and_test(backbone: CAVMAE, data: DataConfig, head_cfg: HeadConfig, *, seed: int, batch_size: int,
                   amp: torch.dtype | None = None, log=None) -> dict[str, Any]:
    """Segment classifier on the train split's segments, segment accuracy on the test split's (percent)."""
    device = next(backbone.parameters()).device
    train_set, test_set = SegmentDataset(data, "train", seed), SegmentDataset(data, "test", seed)
    x_tr, y_tr, _ = segment_features(backbone, train_set, batch_size, amp)
    x_te, y_te, t_te = segment_features(backbone, test_set, batch_size, amp)
    S = train_set.num_segments
    torch.manual_seed(seed)
    head = Classifier(x_tr.shape[-1], train_set.background + 1).to(device)
    videos = min(head_cfg.batch_size, len(x_tr))
    steps = -(-len(x_tr) // videos)
    losses = fit(head, head_cfg, feature_batches(x_tr.flatten(0, 1).to(device), y_tr.flatten().to(device),
                                                 videos * S, seed), steps, F.cross_entropy,
                 on_epoch=epoch_logger("ave", head_cfg.epochs, log))
    with torch.no_grad():
        pred = head(x_te.to(device)).argmax(-1).cpu()  # (N, S)
    per_task = {}
    for k, name in enumerate(test_set.task_names):
        rows = t_te == k
        if rows.any():
            per_task[name] = {"accuracy": segment_accuracy(pred[rows], y_te[rows]), "videos": int(rows.sum())}
    background = y_te == test_set.background
    return {"accuracy": segment_accuracy(pred, y_te), "videos": len(y_te), "segments_per_video": S,
            "background_share": 100.0 * background.double().mean().item(),
            "accuracy_event_segments": segment_accuracy(pred[~background], y_te[~background]),
            "accuracy_background_segments": segment_accuracy(pred[background], y_te[background]) if background.any()
            else None, "per_task": per_task, "loss_per_epoch": losses}


def run_ave(ctx: Context) -> tuple[dict[str, Any], list[list[str]]]:
    """`stella eval --task ave`: the segment classifier on the final checkpoint's frozen backbone."""
    r = ctx.target.recipe
    head_cfg = r.eval.ave
    root = head_cfg.root or r.data.root
    meta = read_meta(root)
    data = dataclasses.replace(r.data, root=root, dataset=meta["dataset"], tasks=[])
    probe = AVDataset(data, "test", train=False)
    if probe.event(0) is None:
        raise TaskSkipped(f"{root}: no event windows (prepare AVE with `stella prep ave` and set eval.ave.root)")
    backbone = ctx.load().backbone
    out = train_and_test(backbone, data, head_cfg, seed=r.eval.seed, batch_size=r.eval.batch_size, amp=ctx.amp,
                         log=ctx.log)
    metrics = {"segment accuracy": out["accuracy"], "event segments": out["accuracy_event_segments"]}
    for name, v in out["per_task"].items():
        metrics[f"segment accuracy {name}"] = v["accuracy"]
    table = [["videos", "segment accuracy", "videos (n)"], ["all", f"{out['accuracy']:.2f}", str(out["videos"])]]
    table += [[k, f"{v['accuracy']:.2f}", str(v["videos"])] for k, v in out["per_task"].items()]
    return {"metrics": metrics, "data_root": root, "head": dataclasses.asdict(head_cfg), **out}, table
