"""Audio-visual classification probe (method.md §6.3, the authors' `Finetune_head` on VGGSound).

Frozen backbone; the trainable `Classifier` reads cls_feats = [mean audio; mean video] of the unmasked joint pass
after `norm` (CAVMAE.joint_embed, (B, 2D)). One-hot CE; AdamW lr 5e-4, betas (0.95, 0.999), wd 5e-6, 15 epochs,
2 warm-up epochs then cosine (downstream.fit). Training clips get the pre-training augmentations (crop, noise,
roll) plus SpecAugment (one frequency mask of width U[0, freqm) and one time mask of width U[0, timem), set to the
un-normalised 0, before noise and roll, as CAV-MAE's loader). Test: `test_clips` windows per video at evenly
spaced starts (0, 2, 4, 6 s on 10 s clips), softmax averaged; top-1 and top-5, overall and per task. The head of
the last epoch is tested; `select_epoch: best_test` keeps the epoch with the best top-1 of the middle window on
the test split instead (the authors' eval split: the test clips, sample_type "middle").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stella_cli.config import DataConfig, HeadConfig
from stella_cli.data import AVDataset, add_fbank_noise, build_loader, frame_indices, num_batches, roll_time
from stella_cli.downstream import Context, epoch_logger, fit, joint_features, selection, topk_correct
from stella_cli.model import CAVMAE, Classifier


def spec_augment(fbank: np.ndarray, freqm: int, timem: int, fill: float, generator: torch.Generator) -> np.ndarray:
    """torchaudio's FrequencyMasking(freqm) then TimeMasking(timem) on one (T, M) fbank: width = int(u·param),
    start = int(u'·(size - width)), masked values set to `fill`."""
    out = fbank.copy()
    for axis, param in ((1, freqm), (0, timem)):
        if param <= 0:
            continue
        size = out.shape[axis]
        width = int(float(torch.rand((), generator=generator)) * min(param, size))
        start = int(float(torch.rand((), generator=generator)) * (size - width))
        index = [slice(None), slice(None)]
        index[axis] = slice(start, start + width)
        out[tuple(index)] = fill
    return out


class ProbeDataset(AVDataset):
    """AVDataset plus SpecAugment in training, or `test_clips` frame windows per item at evaluation.

    Test items hold video (test_clips, F, 3, S, S); the audio is the whole clip's fbank, as in training.
    """

    def __init__(self, cfg: DataConfig, split: str, head: HeadConfig, *, train: bool, seed: int):
        super().__init__(cfg, split, train=train, seed=seed)
        self.freqm, self.timem = head.freqm, head.timem
        window = cfg.num_frames * cfg.frame_stride
        self.test_starts = np.rint(np.linspace(0, self.spec.num_frames - window, head.test_clips)).astype(int)
        self._start: int | None = None

    def sample_frames(self, generator: torch.Generator | None) -> np.ndarray:
        if self._start is not None:
            return frame_indices(self._start, self.cfg.num_frames, self.cfg.frame_stride)
        return super().sample_frames(generator)

    def load_audio(self, row: int, generator: torch.Generator | None) -> Tensor:
        if generator is None:
            return super().load_audio(row, None)
        c = self.cfg
        fbank = (self.reader.fbank(row) - np.float32(c.fbank_mean)) / np.float32(c.fbank_std)
        fbank = spec_augment(fbank, self.freqm, self.timem, (0 - c.fbank_mean) / c.fbank_std, generator)
        if c.train_noise:
            fbank = add_fbank_noise(fbank, generator)
        if c.train_time_roll:
            fbank = roll_time(fbank, generator)
        return torch.from_numpy(np.ascontiguousarray(fbank, dtype=np.float32)).unsqueeze(0)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = super().__getitem__(index)
        if not self.train:
            row = self.records[index]["row"]
            clips = []
            for start in self.test_starts:
                self._start = int(start)
                clips.append(self.load_video(row, None))
            self._start = None
            item["video"] = torch.stack(clips)  # (test_clips, F, 3, S, S)
        return item


def averaged_clip_probs(logits: Tensor) -> Tensor:
    """(N, clips, C) logits -> (N, C): the softmax of each clip, averaged over the clips of a video."""
    return logits.float().softmax(dim=-1).mean(dim=1)


def train_and_test(backbone: CAVMAE, data: DataConfig, head_cfg: HeadConfig, *, seed: int,
                   amp: torch.dtype | None = None, num_workers: int = 0, log=None) -> dict[str, Any]:
    """Train the Classifier on `data`'s train split and test it on its test split; metrics in percent."""
    device = next(backbone.parameters()).device
    train_set = ProbeDataset(data, "train", head_cfg, train=True, seed=seed)
    test_set = ProbeDataset(data, "test", head_cfg, train=False, seed=seed)
    classes = sorted(set(train_set.labels.tolist()))  # the trained classes, as contiguous outputs
    to_out = torch.full((int(max(train_set.labels.max(), test_set.labels.max())) + 1,), -1, dtype=torch.long)
    to_out[torch.tensor(classes)] = torch.arange(len(classes))
    torch.manual_seed(seed)
    head = Classifier(2 * backbone.embed_dim, len(classes)).to(device)
    batch = min(head_cfg.batch_size, len(train_set))
    steps = num_batches(len(train_set), batch, drop_last=True)

    def batches(epoch: int):
        loader = build_loader(train_set, batch, shuffle=True, seed=seed, epoch=epoch, drop_last=True,
                              num_workers=num_workers)
        for b in loader:
            yield joint_features(backbone, b["audio"], b["video"], amp), to_out[b["label"]].to(device)

    evaluate = None
    if head_cfg.select_epoch == "best_test":
        x_eval, y_eval = middle_window_features(backbone, data, head_cfg.batch_size, amp, num_workers)
        y_eval = to_out[y_eval].to(device)

        def evaluate() -> float:
            return 100 * (head(x_eval).argmax(1) == y_eval).double().mean().item()

    fitted = fit(head, head_cfg, batches, steps, F.cross_entropy,
                 on_epoch=epoch_logger("classification", head_cfg.epochs, log), evaluate=evaluate)
    probs, labels, tasks = [], [], []
    loader = build_loader(test_set, head_cfg.batch_size, shuffle=False, seed=0, epoch=0, drop_last=False,
                          num_workers=num_workers)
    with torch.no_grad():
        for b in loader:
            B, C = b["video"].shape[:2]
            video = b["video"].flatten(0, 1)  # (B·clips, F, 3, S, S)
            audio = b["audio"].repeat_interleave(C, dim=0)
            logits = head(joint_features(backbone, audio, video, amp)).reshape(B, C, -1)
            probs.append(averaged_clip_probs(logits).cpu())
            labels.append(to_out[b["label"]])
            tasks.append(b["task"])
    probs, labels, tasks = torch.cat(probs), torch.cat(labels), torch.cat(tasks)
    top1, top5 = topk_correct(probs, labels, 1), topk_correct(probs, labels, 5)
    per_task = {}
    for k, name in enumerate(test_set.task_names):
        rows = tasks == k
        if rows.any():
            per_task[name] = {"top1": 100 * top1[rows].double().mean().item(),
                              "top5": 100 * top5[rows].double().mean().item(), "videos": int(rows.sum())}
    return {"top1": 100 * top1.double().mean().item(), "top5": 100 * top5.double().mean().item(),
            "videos": len(labels), "classes": len(classes), "per_task": per_task, "chance_top1": 100 / len(classes),
            **selection(head_cfg, fitted)}


@torch.no_grad()
def middle_window_features(backbone: CAVMAE, data: DataConfig, batch_size: int, amp: torch.dtype | None,
                           num_workers: int) -> tuple[Tensor, Tensor]:
    """Joint features (N, 2D) of the test clips' middle window, and their labels (N,): the authors' eval split."""
    device = next(backbone.parameters()).device
    loader = build_loader(AVDataset(data, "test", train=False), batch_size, shuffle=False, seed=0, epoch=0,
                          drop_last=False, num_workers=num_workers)
    feats, labels = [], []
    for b in loader:
        feats.append(joint_features(backbone, b["audio"], b["video"], amp))
        labels.append(b["label"])
    return torch.cat(feats).to(device), torch.cat(labels)


def run_classification(ctx: Context) -> tuple[dict[str, Any], list[list[str]]]:
    """`stella eval --task classification`: the probe on the final checkpoint's frozen backbone."""
    r = ctx.target.recipe
    head_cfg = r.eval.classification
    data = dataclasses.replace(r.data, root=head_cfg.root or r.data.root, tasks=[])
    backbone = ctx.load().backbone
    out = train_and_test(backbone, data, head_cfg, seed=r.eval.seed, amp=ctx.amp,
                         num_workers=data.num_workers, log=ctx.log)
    metrics = {"top1": out["top1"], "top5": out["top5"]}
    for name, v in out["per_task"].items():
        metrics[f"top1 {name}"], metrics[f"top5 {name}"] = v["top1"], v["top5"]
    table = [["task", "top-1", "top-5", "videos"], ["all", f"{out['top1']:.2f}", f"{out['top5']:.2f}",
                                                     str(out["videos"])]]
    table += [[k, f"{v['top1']:.2f}", f"{v['top5']:.2f}", str(v["videos"])] for k, v in out["per_task"].items()]
    return {"metrics": metrics, "data_root": data.root, "head": dataclasses.asdict(head_cfg), **out}, table
