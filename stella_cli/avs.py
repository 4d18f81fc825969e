"""Sound-source segmentation (AVSBench S4; method.md §6.3): a mask decoder on the frozen backbone.

Annotated frames: AVSBench S4 annotates one frame per second of its 5 s clips; frame k (k = 0..4) is the last of 16
frames its preprocess_s4.py samples in second k, t_k = k + 15/16 s, here the cached frame floor(t_k·fps) (k + 7/8 s
at 8 fps). Training uses frame 0's mask only (S4's train split has one mask per video, the authors' loss reads
frame 0); the test scores every annotated frame, as S4's test (five per video; on the synthetic benchmark one per
second). The input for annotated frame k: `num_frames` frames at 1 fps from it (annotated frames k, k+1, ...,
the last one repeated where the clip ends; for k = 0 the authors' frames 1-4) and the second of audio [k, k+1)
(98 fbank rows padded symmetrically, downstream.one_second; for k = 0 the authors' audio_duration=1.0). The
decoder reads the tokens of the window's first frame, the one the mask belongs to.

Masks: cache/{split}/masks.npy, uint8 (N, K, S, S) (`stella prep avs`: resized and centre-cropped like the frames),
else the synthetic sounding object's box in the annotated frame.

The head follows the authors' `Finetune_segmentation` (their release has one, but it cannot train as released:
its imports are missing, method.md §9.3 B1, and its optimiser is built from the frozen backbone's parameters
only): for every fusion layer, the first frame's video tokens of the joint pass at the input of `mlp.fc2` (4D wide,
3072 for ViT-B) -> Linear to C channels -> a (S/p)² map, bicubic upsampling x4, parallel dilated 3x3 convolutions
(ASPP-like, summed); the layers' maps are summed; audio guidance in the spirit of TPAVI: the mean of the joint
pass's audio tokens before the final norm (their `embedding_a`) -> Linear to C, a sigmoid attention map from its
dot product with every position, x + x·map; then conv-ReLU-conv to one logit map, bilinearly resized to the frame.
BCE on the mask.

Metrics as AVSBench's test.py (utils/utility.py `mask_iou`, `Eval_Fmeasure`), on batches of `test_batch` videos
with all their annotated frames (its test.sh: 4), averaged over batches:
- mIoU: P = prob > 0.5; IoU = |P ∩ G| / (|P ∪ G| + 1e-7); a frame whose ground truth is empty scores the share of
  its pixels predicted background, |¬P ∩ ¬G| / pixels; the mean over the batch's frames.
- F-score (β² = 0.3): frames with an empty ground truth are left out; for each remaining frame precision P_t and
  recall R_t of prob >= t at 255 thresholds t in linspace(0, 1 - 1e-10), F_t = 1.3·P_t·R_t / (0.3·P_t + R_t)
  (0 where undefined), averaged over those frames; the batch scores its best t (0 if no frame has an object).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_cli.config import AVSHeadConfig, DataConfig
from stella_cli.data import AVDataset, build_loader, shard_indices
from stella_cli.cache import read_meta
from stella_cli.errors import StellaError
from stella_cli.downstream import Context, TaskSkipped, epoch_logger, fit, one_second, selection
from stella_cli.model import CAVMAE

ANNOTATION_OFFSET = 15 / 16  # AVSBench's frame k is the 16th of 16 frames sampled in second k (preprocess_s4.py)
F_THRESHOLDS = 255
F_BETA2 = 0.3


# ----------------------------------------------------------------------------------------------------------
# metrics (AVSBench utils/utility.py)


def frame_iou(prob: Tensor, target: Tensor) -> Tensor:
    """(N,) AVSBench's IoU per frame of prob (N, H, W) > 0.5 against the 0/1 target; an empty target scores the
    share of pixels predicted background."""
    pred, gt = prob.flatten(1) > 0.5, target.flatten(1) > 0.5
    inter, union = (pred & gt).sum(1).double(), (pred | gt).sum(1).double()
    empty = ~gt.any(1)
    inter = torch.where(empty, (~pred & ~gt).sum(1).double(), inter)
    union = torch.where(empty, torch.full_like(union, gt.shape[1]), union)
    return inter / (union + 1e-7)


def frame_f_curve(prob: Tensor, target: Tensor, beta2: float = F_BETA2) -> Tensor:
    """(N, 255) F_beta of prob >= t per frame at AVSBench's thresholds t = linspace(0, 1 - 1e-10, 255) (float32,
    as theirs); 0 where precision and recall are both 0."""
    prob, gt = prob.flatten(1).float(), target.flatten(1) > 0.5
    n_gt = gt.sum(1).double()
    curve = torch.empty(len(prob), F_THRESHOLDS, dtype=torch.float64, device=prob.device)
    for i, t in enumerate(torch.linspace(0, 1 - 1e-10, F_THRESHOLDS, device=prob.device)):
        hit = prob >= t
        tp = (hit & gt).sum(1).double()
        precision, recall = tp / (hit.sum(1).double() + 1e-20), tp / (n_gt + 1e-20)
        curve[:, i] = torch.nan_to_num((1 + beta2) * precision * recall / (beta2 * precision + recall), nan=0.0)
    return curve


def batch_scores(iou: Tensor, curve: Tensor, empty: Tensor, video: Tensor, videos_per_batch: int
                 ) -> tuple[float, float]:
    """(mIoU, F) in percent over frames given per frame (iou (N,), F curve (N, 255), empty ground truth (N,), video
    id (N,)): consecutive batches of `videos_per_batch` videos, each scored as AVSBench's test.py scores one batch
    (mean IoU of its frames; F at the batch's best threshold over its frames with an object), then averaged."""
    videos = list(dict.fromkeys(video.tolist()))  # in order of appearance
    ious, fs = [], []
    for i in range(0, len(videos), videos_per_batch):
        rows = torch.isin(video, torch.tensor(videos[i:i + videos_per_batch]))
        ious.append(iou[rows].mean().item())
        keep = rows & ~empty
        fs.append(curve[keep].mean(0).max().item() if keep.any() else 0.0)
    return 100 * float(np.mean(ious)), 100 * float(np.mean(fs))


# ----------------------------------------------------------------------------------------------------------
# data


def box_mask(box: np.ndarray, size: int) -> np.ndarray:
    """float32 (size, size): 1 at pixels whose centre lies in the box (x0, y0, x1, y1 in [0, 1])."""
    centres = (np.arange(size) + 0.5) / size
    inside_x = (centres >= box[0]) & (centres <= box[2])
    inside_y = (centres >= box[1]) & (centres <= box[3])
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a square (S, S) mask to (size, size), float32 0/1 (the frames are resized from
    the same S x S crop)."""
    idx = ((np.arange(size) + 0.5) * mask.shape[0] / size).astype(int)
    return (mask[idx][:, idx] > 0).astype(np.float32)


def annotated_frames(fps: float, seconds: int, num_cached: int) -> np.ndarray:
    """(seconds,) cached index of AVSBench's annotated frame k: floor((k + 15/16)·fps), within the cache."""
    return np.minimum(np.floor((np.arange(seconds) + ANNOTATION_OFFSET) * fps).astype(int), num_cached - 1)


class MaskDataset(AVDataset):
    """Items (one per annotated frame k of a clip; only k = 0 unless all_frames): video (F, 3, S, S) of annotated
    frames k, k+1, ..., audio (1, T, M) of second k, mask (S, S) of frame k, task, clip (the clip's index)."""

    def __init__(self, cfg: DataConfig, split: str, seed: int, all_frames: bool = False):
        super().__init__(cfg, split, train=False, seed=seed)
        path = self.root / "cache" / split / "masks.npy"
        masks = np.load(path, mmap_mode="r") if path.is_file() else None
        self.masks = masks[:, None] if masks is not None and masks.ndim == 3 else masks  # (N, K, S, S)
        self.annotated = annotated_frames(self.spec.fps, max(int(self.spec.clip_seconds), 1), self.spec.num_frames)
        per_clip = self.masks.shape[1] if self.masks is not None else len(self.annotated)
        if per_clip > len(self.annotated):
            raise StellaError(f"{path}: {per_clip} masks per clip but its {self.spec.clip_seconds} s clips have "
                              f"{len(self.annotated)} annotated frames; run `stella prep avs` again")
        self.items = [(clip, k) for clip in range(len(self.records)) for k in range(per_clip if all_frames else 1)]
        self._frames: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.items)

    def has_masks(self) -> bool:
        if len(self) == 0:
            return False
        return self.masks is not None or self.boxes(0) is not None

    def window(self, k: int) -> np.ndarray:
        """(F,) cached indices of annotated frames k, k+1, ... (the last annotated frame repeated at the end)."""
        return self.annotated[np.minimum(k + np.arange(self.cfg.num_frames), len(self.annotated) - 1)]

    def sample_frames(self, generator: torch.Generator | None) -> np.ndarray:
        return self._frames if self._frames is not None else self.window(0)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        clip, k = self.items[index]
        row, c, sr = self.records[clip]["row"], self.cfg, self.spec.sample_rate
        self._frames = self.window(k)
        video = self.load_video(row, None)
        self._frames = None
        fbank = one_second(self.reader.fbank(row), k * sr, sr, c.target_length)
        audio = (fbank - np.float32(c.fbank_mean)) / np.float32(c.fbank_std)
        if self.masks is not None:
            mask = resize_mask(np.asarray(self.masks[row, k]), c.image_size)
        else:
            mask = box_mask(self.boxes(clip)[self.annotated[k]], c.image_size)
        return {"video": video, "audio": torch.from_numpy(audio).float().unsqueeze(0),
                "mask": torch.from_numpy(mask), "task": self.tasks[clip], "clip": torch.tensor(clip)}


# ----------------------------------------------------------------------------------------------------------
# features and head


@torch.no_grad()
def fusion_features(backbone: CAVMAE, audio: Tensor, video: Tensor, amp: torch.dtype | None
                    ) -> tuple[list[Tensor], Tensor]:
    """First-frame video tokens at the input of every fusion layer's mlp.fc2 ([(B, (S/p)², 4D)]) and the mean of
    the joint pass's audio tokens before the final `norm` ((B, D), the authors' `embedding_a`), from one unmasked
    joint pass."""
    device = next(backbone.parameters()).device
    captured: list[Tensor] = []
    hooks = [blk.mlp.fc2.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
             for blk in backbone.blocks_u]
    try:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            e_a, _ = backbone.joint_codes(*backbone.unimodal_codes(audio.to(device), video.to(device)))
    finally:
        for h in hooks:
            h.remove()
    L_A, per_frame = e_a.shape[1], backbone.grid ** 2
    video_tokens = [h[:, L_A:L_A + per_frame].float() for h in captured]  # frame 0: tokens 0 .. (S/p)² - 1
    return video_tokens, e_a.mean(1).float()


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
Batch = tuple[tuple[list[Tensor], Tensor], dict[str, Tensor]]  # ((tokens per layer, audio guide), {mask, task, clip})


class Features:
    """The fusion features of a MaskDataset, computed once when they fit in CACHE_BYTES, else at every pass."""

    def __init__(self, backbone: CAVMAE, dataset: MaskDataset, batch: int, amp: torch.dtype | None):
        self.backbone, self.dataset, self.batch, self.amp = backbone, dataset, batch, amp
        hidden, layers = backbone.blocks_u[0].mlp.fc2.in_features, len(backbone.blocks_u)
        size = 4 * len(dataset) * (layers * backbone.grid ** 2 * hidden + backbone.embed_dim)
        self.cached = None
        if size <= CACHE_BYTES:
            inputs, extras = zip(*self._loaded(shuffle=False, seed=0, epoch=0))
            tokens = [torch.cat(layer) for layer in zip(*(t for t, _ in inputs))]
            audio = torch.cat([a for _, a in inputs])
            self.cached = (tokens, audio, {k: torch.cat([e[k] for e in extras]) for k in extras[0]})

    def _loaded(self, *, shuffle: bool, seed: int, epoch: int) -> Iterator[Batch]:
        for b in build_loader(self.dataset, self.batch, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=False,
                              num_workers=0):
            yield (fusion_features(self.backbone, b["audio"], b["video"], self.amp),
                   {k: b[k] for k in ("mask", "task", "clip")})

    def batches(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> Iterator[Batch]:
        """The batches of the loader for (shuffle, seed, epoch), from the cache when there is one."""
        if self.cached is None:
            yield from self._loaded(shuffle=shuffle, seed=seed, epoch=epoch)
            return
        tokens, audio, extra = self.cached
        order = torch.tensor(shard_indices(len(audio), shuffle=shuffle, seed=seed, epoch=epoch, drop_last=False))
        for i in range(0, len(order), self.batch):  # the loader's batches
            idx = order[i:i + self.batch]
            yield ([t[idx] for t in tokens], audio[idx]), {k: v[idx] for k, v in extra.items()}


@torch.no_grad()
def score_frames(head: AVSHead, features: Features) -> dict[str, Tensor]:
    """Per test frame: iou (N,), f_curve (N, 255), empty (N,) ground truth, share (N,) of the frame in the mask,
    clip (N,), task (N,)."""
    out: dict[str, list[Tensor]] = {k: [] for k in ("iou", "f_curve", "empty", "share", "clip", "task")}
    for x, extra in features.batches():
        prob = torch.sigmoid(head(x))
        mask = extra["mask"].to(prob.device)
        out["iou"].append(frame_iou(prob, mask).cpu())
        out["f_curve"].append(frame_f_curve(prob, mask).cpu())
        out["empty"].append(~(mask > 0.5).flatten(1).any(1).cpu())
        out["share"].append((mask > 0.5).flatten(1).double().mean(1).cpu())
        out["clip"].append(extra["clip"])
        out["task"].append(extra["task"])
    return {k: torch.cat(v) for k, v in out.items()}


def train_and_test(backbone: CAVMAE, data: DataConfig, head_cfg: AVSHeadConfig, *, seed: int,
                   amp: torch.dtype | None = None, log=None) -> dict[str, Any]:
    """Train the head on the train split's frame-0 masks; mIoU and F-score (percent) on every annotated frame of
    the test split."""
    device = next(backbone.parameters()).device
    train_set, test_set = MaskDataset(data, "train", seed), MaskDataset(data, "test", seed, all_frames=True)
    torch.manual_seed(seed)
    head = AVSHead(backbone.blocks_u[0].mlp.fc2.in_features, backbone.embed_dim, len(backbone.blocks_u),
                   backbone.grid, data.image_size, channels=head_cfg.channels).to(device)
    batch = min(head_cfg.batch_size, len(train_set))
    train = Features(backbone, train_set, batch, amp)
    test = Features(backbone, test_set, batch, amp)
    if log is not None and len(test_set) < len(test_set.records) * len(test_set.annotated):
        log(f"avs: {len(test_set) // max(len(test_set.records), 1)} annotated frame(s) per test clip of "
            f"{len(test_set.annotated)} (masks prepared before all were cached?); `stella prep avs` again scores all")

    def batches(epoch: int):
        for x, extra in train.batches(shuffle=True, seed=seed, epoch=epoch):
            yield x, extra["mask"].to(device)

    def evaluate() -> float:  # select_epoch best_test: mIoU on the test split
        s = score_frames(head, test)
        return batch_scores(s["iou"], s["f_curve"], s["empty"], s["clip"], head_cfg.test_batch)[0]

    fitted = fit(head, head_cfg, batches, -(-len(train_set) // batch), F.binary_cross_entropy_with_logits,
                 on_epoch=epoch_logger("avs", head_cfg.epochs, log), evaluate=evaluate)
    s = score_frames(head, test)
    miou, f = batch_scores(s["iou"], s["f_curve"], s["empty"], s["clip"], head_cfg.test_batch)
    per_task = {}
    for k, name in enumerate(test_set.task_names):
        rows = s["task"] == k
        if rows.any():
            t_miou, t_f = batch_scores(s["iou"][rows], s["f_curve"][rows], s["empty"][rows], s["clip"][rows],
                                       head_cfg.test_batch)
            per_task[name] = {"mIoU": t_miou, "F": t_f, "clips": len(set(s["clip"][rows].tolist())),
                              "frames": int(rows.sum())}
    return {"mIoU": miou, "F": f, "clips": len(test_set.records), "frames": len(s["iou"]),
            "frames_per_clip": len(test_set) // max(len(test_set.records), 1),
            "empty_frames": int(s["empty"].sum()), "mask_share": 100 * s["share"].mean().item(), "per_task": per_task,
            **selection(head_cfg, fitted)}


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
    table = [["task", "mIoU", "F-score", "videos", "frames"],
             ["all", f"{out['mIoU']:.2f}", f"{out['F']:.2f}", str(out["clips"]), str(out["frames"])]]
    table += [[k, f"{v['mIoU']:.2f}", f"{v['F']:.2f}", str(v["clips"]), str(v["frames"])]
              for k, v in out["per_task"].items()]
    return {"metrics": metrics, "data_root": root, "head": dataclasses.asdict(head_cfg), **out}, table
