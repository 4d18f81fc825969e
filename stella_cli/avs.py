"""Sound-source segmentation (AVSBench S4; method.md §6.3): a mask decoder on the frozen backbone.

Input: `num_frames` frames at 1 fps from the clip's start (AVSBench's 1 fps frames) and the first second of audio
(the authors' audio_duration=1.0), padded like an AVE segment. Target: the sounding object's mask on the first
frame (AVSBench S4 trains on it; the synthetic benchmark rasterises the sounding object's box).

The head follows the authors' (their release captures the fusion layers' MLP hidden activations with a missing
hook module and has no metric): for every fusion layer, the first frame's video tokens of the joint pass at the
input of `mlp.fc2` (4D wide, 3072 for ViT-B) -> Linear to C channels -> a (S/p)² map, bicubic upsampling x4,
parallel dilated 3x3 convolutions (ASPP-like, summed); the layers' maps are summed; audio guidance in the spirit
of TPAVI: the mean joint audio embedding -> Linear to C, a sigmoid attention map from its dot product with every
position, x + x·map; then conv-ReLU-conv to one logit map, bilinearly resized to the frame. BCE on the mask.
Metrics as AVSBench reports them: mIoU (per-frame IoU of the mask thresholded at 0.5, averaged; 1 when both are
empty) and the F-score with beta² = 0.3 (per-frame precision/recall at 255 thresholds, F averaged over frames,
then the best threshold).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_cli.config import DataConfig, HeadConfig
from stella_cli.data import AVDataset, build_loader, frame_indices
from stella_cli.cache import read_meta
from stella_cli.downstream import FBANK_FRAMES_PER_SECOND, Context, TaskSkipped, epoch_logger, fit, pad_segment
from stella_cli.model import CAVMAE


# ----------------------------------------------------------------------------------------------------------
# metrics


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """(N,) IoU of binary masks (N, H, W); 1 where both are empty."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1).double()
    union = (pred | target).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def f_score(prob: Tensor, target: Tensor, beta2: float = 0.3, num_thresholds: int = 255) -> float:
    """AVSBench's F-measure: per frame, precision and recall of prob >= t for t in linspace(0, 1 - 1e-10, 255),
    F_beta = (1 + beta²)·P·R / (beta²·P + R) (0 where undefined), averaged over frames; the best threshold."""
    prob, target = prob.flatten(1).double(), target.flatten(1).bool()
    gt = target.sum(1).double()
    best = 0.0
    for t in torch.linspace(0, 1 - 1e-10, num_thresholds, dtype=torch.float64):
        hit = prob >= t
        tp = (hit & target).sum(1).double()
        precision, recall = tp / (hit.sum(1).double() + 1e-20), tp / (gt + 1e-20)
        f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
        best = max(best, torch.nan_to_num(f, nan=0.0).mean().item())
    return best


# ----------------------------------------------------------------------------------------------------------
# data


def box_mask(box: np.ndarray, size: int) -> np.ndarray:
    """float32 (size, size): 1 at pixels whose centre lies in the box (x0, y0, x1, y1 in [0, 1])."""
    centres = (np.arange(size) + 0.5) / size
    inside_x = (centres >= box[0]) & (centres <= box[2])
    inside_y = (centres >= box[1]) & (centres <= box[3])
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a square (S, S) mask to (size, size), float32 0/1."""
    idx = ((np.arange(size) + 0.5) * mask.shape[0] / size).astype(int)
    return (mask[idx][:, idx] > 0).astype(np.float32)


class MaskDataset(AVDataset):
    """Items: video (F, 3, S, S) at 1 fps from t = 0, audio (1, T, M) of the first second, mask (S, S) of frame 0.

    Masks: cache/{split}/masks.npy (written by `stella prep avs`), else the synthetic sounding object's box."""

    def __init__(self, cfg: DataConfig, split: str, seed: int):
        super().__init__(cfg, split, train=False, seed=seed)
        path = self.root / "cache" / split / "masks.npy"
        self.masks = np.load(path, mmap_mode="r") if path.is_file() else None
        self.stride = max(int(round(self.spec.fps)), 1)

    def has_masks(self) -> bool:
        if len(self) == 0:
            return False
        return self.masks is not None or self.boxes(0) is not None

    def sample_frames(self, generator: torch.Generator | None) -> np.ndarray:
        return np.minimum(frame_indices(0, self.cfg.num_frames, self.stride), self.spec.num_frames - 1)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rec, c = self.records[index], self.cfg
        video = self.load_video(rec["row"], None)
        fbank = self.reader.fbank(rec["row"])[:FBANK_FRAMES_PER_SECOND]
        audio = (pad_segment(fbank, c.target_length) - np.float32(c.fbank_mean)) / np.float32(c.fbank_std)
        if self.masks is not None:
            mask = resize_mask(np.asarray(self.masks[rec["row"]]), c.image_size)
        else:
            mask = box_mask(self.boxes(index)[self.sample_frames(None)[0]], c.image_size)
        return {"video": video, "audio": torch.from_numpy(audio).float().unsqueeze(0),
                "mask": torch.from_numpy(mask), "task": self.tasks[index]}


# ----------------------------------------------------------------------------------------------------------
# features and head


@torch.no_grad()
def fusion_features(backbone: CAVMAE, audio: Tensor, video: Tensor, amp: torch.dtype | None
                    ) -> tuple[list[Tensor], Tensor]:
    """First-frame video tokens at the input of every fusion layer's mlp.fc2 ([(B, (S/p)², 4D)]) and the mean joint
    audio embedding after `norm` ((B, D)), from one unmasked joint pass."""
    device = next(backbone.parameters()).device
    captured: list[Tensor] = []
    hooks = [blk.mlp.fc2.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
             for blk in backbone.blocks_u]
    try:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            e_a, e_v = backbone.joint_codes(*backbone.unimodal_codes(audio.to(device), video.to(device)))
            x = backbone.norm(torch.cat([e_a, e_v], dim=1))
    finally:
        for h in hooks:
            h.remove()
    L_A, per_frame = e_a.shape[1], backbone.grid ** 2
    video_tokens = [h[:, L_A:L_A + per_frame].float() for h in captured]  # frame 0: tokens 0 .. (S/p)² - 1
    return video_tokens, x[:, :L_A].mean(1).float()


class AVSHead(nn.Module):
    """Mask decoder on the fusion layers' first-frame tokens with audio guidance (see the module docstring)."""

    def __init__(self, hidden: int, audio_dim: int, layers: int, grid: int, out_size: int, channels: int = 128,
                 dilations: tuple[int, ...] = (1, 2, 4, 6)):
        super().__init__()
        self.grid, self.out_size = grid, out_size
        self.proj = nn.ModuleList([nn.Linear(hidden, channels) for _ in range(layers)])
        self.aspp = nn.ModuleList([nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=d, dilation=d)
                                                  for d in dilations]) for _ in range(layers)])
        self.audio = nn.Linear(audio_dim, channels)
        self.out = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, inputs: tuple[list[Tensor], Tensor]) -> Tensor:
        tokens, audio = inputs
        B, g = audio.shape[0], self.grid
        x = 0
        for proj, convs, t in zip(self.proj, self.aspp, tokens):
            m = proj(t).transpose(1, 2).reshape(B, -1, g, g)  # (B, C, g, g)
            m = F.interpolate(m, scale_factor=4, mode="bicubic", align_corners=False)  # (B, C, 4g, 4g)
            x = x + sum(F.relu(conv(m)) for conv in convs)
        a = self.audio(audio)[:, :, None, None]  # (B, C, 1, 1)
        attention = torch.sigmoid((x * a).sum(1, keepdim=True) / x.shape[1] ** 0.5)  # (B, 1, 4g, 4g)
        x = x + x * attention
        logits = self.out(x)  # (B, 1, 4g, 4g)
        return F.interpolate(logits, size=(self.out_size, self.out_size), mode="bilinear",
                             align_corners=False)[:, 0]  # (B, S, S)


CACHE_BYTES = 2**30  # frozen, unaugmented inputs: features are computed once when they fit in this much memory


def collect(backbone: CAVMAE, dataset: MaskDataset, batch: int, amp: torch.dtype | None
            ) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Fusion features of a whole split: [(N, (S/p)², 4D)] per layer, audio (N, D), masks (N, S, S), task (N,)."""
    tokens, audio, masks, tasks = [], [], [], []
    for b in build_loader(dataset, batch, shuffle=False, seed=0, epoch=0, drop_last=False, num_workers=0):
        t, a = fusion_features(backbone, b["audio"], b["video"], amp)
        tokens.append(t)
        audio.append(a)
        masks.append(b["mask"])
        tasks.append(b["task"])
    return [torch.cat(layer) for layer in zip(*tokens)], torch.cat(audio), torch.cat(masks), torch.cat(tasks)


def train_and_test(backbone: CAVMAE, data: DataConfig, head_cfg: HeadConfig, *, seed: int,
                   amp: torch.dtype | None = None, log=None) -> dict[str, Any]:
    """Train the head on the train split's first-frame masks; mIoU and F-score (percent) on the test split."""
    device = next(backbone.parameters()).device
    train_set, test_set = MaskDataset(data, "train", seed), MaskDataset(data, "test", seed)
    hidden = backbone.blocks_u[0].mlp.fc2.in_features
    torch.manual_seed(seed)
    head = AVSHead(hidden, backbone.embed_dim, len(backbone.blocks_u), backbone.grid, data.image_size,
                   channels=head_cfg.channels).to(device)
    batch = min(head_cfg.batch_size, len(train_set))
    feature_bytes = 4 * len(train_set) * (len(backbone.blocks_u) * backbone.grid ** 2 * hidden + backbone.embed_dim)
    cached = collect(backbone, train_set, batch, amp) if feature_bytes <= CACHE_BYTES else None

    def batches(epoch: int):
        if cached is not None:  # the same inputs in the same order as the loader below
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                yield ([t[idx] for t in cached[0]], cached[1][idx]), cached[2][idx].to(device)
            return
        loader = build_loader(train_set, batch, shuffle=True, seed=seed, epoch=epoch, drop_last=False, num_workers=0)
        for b in loader:
            yield fusion_features(backbone, b["audio"], b["video"], amp), b["mask"].to(device)

    losses = fit(head, head_cfg, batches, -(-len(train_set) // batch), F.binary_cross_entropy_with_logits,
                 on_epoch=epoch_logger("avs", head_cfg.epochs, log))
    probs, masks, tasks = [], [], []
    with torch.no_grad():
        for b in build_loader(test_set, batch, shuffle=False, seed=0, epoch=0, drop_last=False, num_workers=0):
            probs.append(torch.sigmoid(head(fusion_features(backbone, b["audio"], b["video"], amp))).cpu())
            masks.append(b["mask"])
            tasks.append(b["task"])
    probs, masks, tasks = torch.cat(probs), torch.cat(masks), torch.cat(tasks)
    iou = mask_iou(probs > 0.5, masks > 0.5)
    per_task = {}
    for k, name in enumerate(test_set.task_names):
        rows = tasks == k
        if rows.any():
            per_task[name] = {"mIoU": 100 * iou[rows].mean().item(), "F": 100 * f_score(probs[rows], masks[rows] > 0.5),
                              "clips": int(rows.sum())}
    return {"mIoU": 100 * iou.mean().item(), "F": 100 * f_score(probs, masks > 0.5), "clips": len(masks),
            "mask_share": 100 * masks.mean().item(), "per_task": per_task, "loss_per_epoch": losses}


def run_avs(ctx: Context) -> tuple[dict[str, Any], list[list[str]]]:
    """`stella eval --task avs`: the mask decoder on the final checkpoint's frozen backbone."""
    r = ctx.target.recipe
    head_cfg = r.eval.avs
    root = head_cfg.root or r.data.root
    data = dataclasses.replace(r.data, root=root, dataset=read_meta(root)["dataset"], tasks=[])
    if not MaskDataset(data, "test", 0).has_masks():
        raise TaskSkipped(f"{root}: no masks (prepare AVSBench S4 with `stella prep avs` and set eval.avs.root)")
    backbone = ctx.load().backbone
    out = train_and_test(backbone, data, head_cfg, seed=r.eval.seed, amp=ctx.amp, log=ctx.log)
    metrics = {"mIoU": out["mIoU"], "F-score": out["F"]}
    for name, v in out["per_task"].items():
        metrics[f"mIoU {name}"], metrics[f"F-score {name}"] = v["mIoU"], v["F"]
    table = [["clips", "mIoU", "F-score", "n"], ["all", f"{out['mIoU']:.2f}", f"{out['F']:.2f}", str(out["clips"])]]
    table += [[k, f"{v['mIoU']:.2f}", f"{v['F']:.2f}", str(v["clips"])] for k, v in out["per_task"].items()]
    return {"metrics": metrics, "data_root": root, "head": dataclasses.asdict(head_cfg), **out}, table
