"""Audio-visual event localisation (AVE; method.md §6.3): a segment classifier on the frozen backbone.

Each video is cut into one-second segments (10 for AVE's 10 s videos, 4 for the synthetic 4 s clips). Segment s
gets `num_frames` frames at fps / num_frames stride inside second s (s + 0, 0.25, 0.5, 0.75 s: the authors' 4 fps
frames 4s .. 4s + 3) and one second of audio: 98 fbank rows (the frames of a 1 s waveform), zero-padded
symmetrically in the un-normalised log-mel domain to the model's `target_length`, as the authors' AVE_Wav2fbank.
Where that second starts (`eval.ave.audio_starts`): "authors" (default) = sample int(linspace(0, len - 1.1 s, S)[s])
of their ave.py, so segment s hears [0.989·s, 0.989·s + 1) s on 10 s clips, up to 0.1 s before its own second (the
last starts at 8.9 s); "seconds" = s s, the benchmark's segment [s, s+1). The rows are cut from the clip's cached fbank (downstream.one_second), which
equals the fbank of the 1 s waveform up to half a frame shift (5 ms) of start; len is the clip's nominal length
(clip_seconds · sample_rate), the authors' the decoded file's (160,000 samples for a whole 10 s clip).
Label of segment s: the video's event category when the event covers at least half of [s, s+1), else background.

The authors' release has no AVE head or metric. Ours, stated here as a design choice: the segment's joint-pass
features [mean audio; mean video] (CAVMAE.joint_embed, 2D) -> the authors' Classifier (the same head as the
classification probe) -> C + 1 classes (C categories + background), trained with CE on every segment, AdamW
lr 1e-3, wd 5e-6, 15 epochs, batch 12 videos, 2 warm-up epochs then cosine. The authors' training segments get
the multi-scale crop; ours are unaugmented by default, so the features are computed once (15x fewer backbone
passes), and `eval.ave.train_crop: true` crops every training segment anew each epoch, as theirs. Metric: segment
accuracy (correct segments / all test segments), as AVE papers report it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stella_cli.config import AVEHeadConfig, DataConfig
from stella_cli.data import AVDataset, build_loader, frame_indices
from stella_cli.cache import read_meta
from stella_cli.downstream import (Context, TaskSkipped, epoch_logger, feature_batches, fit, joint_features,
                                   one_second, selection)
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


def segment_audio_starts(num_segments: int, clip_samples: int, sample_rate: int, mode: str) -> np.ndarray:
    """(S,) first sample of each segment's second of audio. "authors": their ave.py `sample_indx` =
    np.linspace(0, len - sr·(1 + 0.1), S, dtype=int) (0, 15822, ..., 142399 for 160,000 samples); "seconds": s·sr."""
    if mode == "seconds":
        return np.arange(num_segments) * sample_rate
    return np.linspace(0, clip_samples - sample_rate * (1.0 + 0.1), num=num_segments, dtype=int)


class SegmentDataset(AVDataset):
    """Items: video (S, F, 3, H, W), audio (S, 1, T, M) of the S one-second segments, segment labels (S,).
    train=True draws a multi-scale crop per segment (the authors' training transform)."""

    def __init__(self, cfg: DataConfig, split: str, seed: int, audio_starts: str = "authors", train: bool = False):
        super().__init__(dataclasses.replace(cfg, multiscale_crop=train), split, train=train, seed=seed)
        self.num_segments = int(self.spec.clip_seconds)
        self.background = len(self.meta["classes"])
        self.stride = max(int(round(self.spec.fps / cfg.num_frames)), 1)
        clip_samples = int(round(self.spec.clip_seconds * self.spec.sample_rate))
        self.audio_starts = segment_audio_starts(self.num_segments, clip_samples, self.spec.sample_rate, audio_starts)
        self._frames: np.ndarray | None = None

    def sample_frames(self, generator: torch.Generator | None) -> np.ndarray:
        return self._frames if self._frames is not None else super().sample_frames(generator)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rec = self.records[index]
        c, fps = self.cfg, self.spec.fps
        g = self.item_generator(index) if self.train else None
        fbank = self.reader.fbank(rec["row"])  # (T, M) un-normalised
        videos, audios = [], []
        for s in range(self.num_segments):
            self._frames = np.minimum(frame_indices(int(s * fps), c.num_frames, self.stride), self.spec.num_frames - 1)
            videos.append(self.load_video(rec["row"], g))
            part = one_second(fbank, int(self.audio_starts[s]), self.spec.sample_rate, c.target_length)
            audios.append(torch.from_numpy((part - np.float32(c.fbank_mean)) / np.float32(c.fbank_std)).unsqueeze(0))
        self._frames = None
        return {"video": torch.stack(videos), "audio": torch.stack(audios).float(),
                "label": segment_labels(self.event(index), self.num_segments, rec["label"], self.background),
                "task": self.tasks[index]}


def segment_batches(backbone: CAVMAE, dataset: SegmentDataset, videos: int, amp: torch.dtype | None, *,
                    shuffle: bool, seed: int, epoch: int):
    """Yield (B, S, 2D) joint features, (B, S) labels, (B,) task per batch of `videos` videos."""
    loader = build_loader(dataset, videos, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=False, num_workers=0)
    for b in loader:
        B, S = b["label"].shape
        x = joint_features(backbone, b["audio"].flatten(0, 1), b["video"].flatten(0, 1), amp)  # (B·S, 2D)
        yield x.reshape(B, S, -1), b["label"], b["task"]


@torch.no_grad()
def segment_features(backbone: CAVMAE, dataset: SegmentDataset, batch_size: int,
                     amp: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    """(N, S, 2D) joint features, (N, S) labels, (N,) task of every video."""
    videos = max(batch_size // dataset.num_segments, 1)
    parts = list(segment_batches(backbone, dataset, videos, amp, shuffle=False, seed=0, epoch=0))
    return tuple(torch.cat([p[i].cpu() for p in parts]) for i in range(3))


def train_and_test(backbone: CAVMAE, data: DataConfig, head_cfg: AVEHeadConfig, *, seed: int, batch_size: int,
                   amp: torch.dtype | None = None, log=None) -> dict[str, Any]:
    """Segment classifier on the train split's segments, segment accuracy on the test split's (percent)."""
    device = next(backbone.parameters()).device
    train_set = SegmentDataset(data, "train", seed, head_cfg.audio_starts, train=head_cfg.train_crop)
    test_set = SegmentDataset(data, "test", seed, head_cfg.audio_starts)
    x_te, y_te, t_te = segment_features(backbone, test_set, batch_size, amp)
    S = train_set.num_segments
    videos = min(head_cfg.batch_size, len(train_set))
    steps = -(-len(train_set) // videos)
    if head_cfg.train_crop:  # new crops every epoch: the backbone runs on every training segment each epoch
        def batches(epoch: int):
            for x, y, _ in segment_batches(backbone, train_set, videos, amp, shuffle=True, seed=seed, epoch=epoch):
                yield x.flatten(0, 1), y.flatten().to(device)
    else:
        x_tr, y_tr, _ = segment_features(backbone, train_set, batch_size, amp)
        batches = feature_batches(x_tr.flatten(0, 1).to(device), y_tr.flatten().to(device), videos * S, seed)
    torch.manual_seed(seed)
    head = Classifier(x_te.shape[-1], train_set.background + 1).to(device)
    x_te = x_te.to(device)

    def evaluate() -> float:
        return segment_accuracy(head(x_te).argmax(-1).cpu(), y_te)

    fitted = fit(head, head_cfg, batches, steps, F.cross_entropy, on_epoch=epoch_logger("ave", head_cfg.epochs, log),
                 evaluate=evaluate)
    with torch.no_grad():
        pred = head(x_te).argmax(-1).cpu()  # (N, S)
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
            else None, "per_task": per_task, "audio_starts": head_cfg.audio_starts,
            "audio_start_seconds": (test_set.audio_starts / test_set.spec.sample_rate).tolist(),
            **selection(head_cfg, fitted)}


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
    table = [["task", "segment accuracy", "videos"], ["all", f"{out['accuracy']:.2f}", str(out["videos"])]]
    table += [[k, f"{v['accuracy']:.2f}", str(v["videos"])] for k, v in out["per_task"].items()]
    return {"metrics": metrics, "data_root": root, "head": dataclasses.asdict(head_cfg), **out}, table
