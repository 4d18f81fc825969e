"""The Dataset over a prepared folder and the DataLoader that feeds training (method.md §7.2).

One item = one clip of the cache written by `stella prep` (cache.py):

    video   F frames, frame_stride cached frames apart (4 frames at 1 fps from the 8 fps cache), inside a window
            whose start is uniform over the valid starts in training and the middle at evaluation; training:
            GroupMultiScaleCrop shared by all frames, then bilinear resize to image_size; evaluation: resize;
            then [0, 1] and ImageNet mean/std.                                                  (F, 3, S, S)
    audio   the whole clip's cached fbank, (x - fbank_mean) / fbank_std; training: + U(0,1)·r/10 noise with
            r ~ U(0,1) per clip, then a circular roll along time by an integer in [-T, T-1].    (1, T, M)
    label, task (index into meta.json tasks), index (position in this dataset): int64 scalars.

Randomness: no global RNG.  The augmentation of item i in epoch e comes from a torch.Generator seeded from
(seed, e, i), so it depends neither on the worker count nor on the order, and a resumed run reproduces it.
The loader order is a permutation from (seed + epoch), sharded over ranks exactly like DistributedSampler.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from stella_cli.cache import (DONE, SplitReader, open_array, prep_command_of, read_manifest, read_meta,
                              spec_from_meta)
from stella_cli.config import DataConfig
from stella_cli.errors import StellaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # method.md §7.2
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALES = (1.0, 0.875, 0.75)  # method.md §7.2: GroupMultiScaleCrop(input_size, [1, .875, .75]), max_distort 1


# ----------------------------------------------------------------------------------------------------------
# checks


def check_prepared(data_cfg: DataConfig, splits: tuple[str, ...] = ("train", "retrieval")) -> dict[str, Any]:
    """Fail at once when the recipe's data is missing or does not fit the recipe; returns meta.json.

    Missing folder / meta.json / manifest -> StellaError naming the `stella prep` command that makes it;
    a cache whose fbank size, dataset or clip length differs from the recipe -> StellaError naming both;
    a cache file cut short -> StellaError naming it, its size and the command that rebuilds it.
    """
    root = Path(data_cfg.root)
    if not (root / "meta.json").is_file():
        raise StellaError(f"{root}: no prepared data; run `{prep_command_of(root, data_cfg.dataset)}`")
    for split in splits:
        if not (root / f"{split}.csv").is_file():
            raise StellaError(f"{root / f'{split}.csv'}: split {split!r} is not prepared (interrupted?); "
                              f"run `{prep_command_of(root, data_cfg.dataset)}` again to finish it")
    meta = read_meta(root)
    spec = spec_from_meta(meta)
    where = root / "meta.json"
    if meta.get("dataset") != data_cfg.dataset:
        raise StellaError(f"{where}: the folder holds dataset {meta.get('dataset')!r} but data.dataset is "
                          f"{data_cfg.dataset!r}")
    for key in ("target_length", "num_mel_bins"):
        if getattr(spec, key) != getattr(data_cfg, key):
            raise StellaError(f"{where}: the cache has {key}={getattr(spec, key)} but the recipe has "
                              f"data.{key}={getattr(data_cfg, key)}; set data.{key}={getattr(spec, key)} or "
                              f"prepare the data again with that setting")
    window = data_cfg.num_frames * data_cfg.frame_stride
    if data_cfg.num_frames < 1 or data_cfg.frame_stride < 1 or window > spec.num_frames:
        raise StellaError(f"data.num_frames={data_cfg.num_frames} x data.frame_stride={data_cfg.frame_stride} = "
                          f"{window} cached frames do not fit the {spec.num_frames} frames per clip of {where}")
    unknown = [t for t in data_cfg.tasks if t not in meta["tasks"]]
    if unknown:
        raise StellaError(f"data.tasks: {unknown} not in {where} tasks {meta['tasks']}")
    for split in splits:  # every cached array and JPEG file whole: damage is one line here, not in a worker
        SplitReader(root, split, spec).check_rows(r["row"] for r in read_manifest(root, split))
    return meta


# ----------------------------------------------------------------------------------------------------------
# frame sampling (method.md §7.2)


def window_starts(num_cached: int, num_frames: int, frame_stride: int) -> range:
    """Training starts (cached frame index) of the num_frames x frame_stride window.

    faithful: the authors draw start seconds from np.arange(0, 10 - 4, 1/8), which leaves out the last start that
    still fits (80 cached frames -> starts 0..47, not 0..48); when the window fills the whole clip, start 0.
    """
    return range(max(num_cached - num_frames * frame_stride, 1))


def eval_start(num_cached: int, num_frames: int, frame_stride: int) -> int:
    """The "middle" start: 24 for 80 cached frames and a 32-frame window (the authors' 3 s), 0 for 32 frames."""
    return (num_cached - num_frames * frame_stride) // 2


def frame_indices(start: int, num_frames: int, frame_stride: int) -> np.ndarray:
    """Cached frame indices start + k·frame_stride, k < num_frames (method.md §7.2: s·8 + {0, 8, 16, 24})."""
    return start + frame_stride * np.arange(num_frames)


# ----------------------------------------------------------------------------------------------------------
# video transforms (method.md §7.2, the authors' transforms/video.py)


def fixed_crop_offsets(image_w: int, image_h: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 (x, y) offsets of GroupMultiScaleCrop(more_fix_crop=True): corners, centre, edge centres and the
    four quarter points of a 4 x 4 grid of steps ((image - crop) // 4)."""
    w, h = (image_w - crop_w) // 4, (image_h - crop_h) // 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2),  # corners, centre
            (0, 2), (4, 2), (2, 4), (2, 0),  # centre of each edge
            (1, 1), (3, 1), (1, 3), (3, 3)]  # quarter points
    return [(i * w, j * h) for i, j in grid]


def multiscale_crop_box(image_w: int, image_h: int, image_size: int, generator: torch.Generator
                        ) -> tuple[int, int, int, int]:
    """Draw GroupMultiScaleCrop's crop: (left, top, crop_w, crop_h).

    Side lengths int(min(W, H)·s), s in CROP_SCALES, snapped to image_size when within 3 px; (w, h) pairs whose
    scale indices differ by at most 1; then one of the 13 fixed offsets.  Uniform choices from `generator`.
    """
    base = min(image_w, image_h)
    sides = [image_size if abs(int(base * s) - image_size) < 3 else int(base * s) for s in CROP_SCALES]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    crop_w, crop_h = pairs[_randint(len(pairs), generator)]
    offsets = fixed_crop_offsets(image_w, image_h, crop_w, crop_h)
    left, top = offsets[_randint(len(offsets), generator)]
    return left, top, crop_w, crop_h


def resized_crop(video: np.ndarray, left: int, top: int, crop_w: int, crop_h: int, size: int) -> np.ndarray:
    """Crop every frame at the same box and resize it bilinearly to size x size.

    video: float32 (F, 3, H, W) -> (F, 3, size, size).  Bilinear with PIL's antialiasing when shrinking (the
    authors resize PIL images), the same numbers as torch's interpolate(antialias=True), as two small matmuls.
    """
    x = video[:, :, top:top + crop_h, left:left + crop_w]  # (F, 3, crop_h, crop_w)
    if x.shape[-2:] == (size, size):
        return x
    rows, cols = bilinear_matrix(crop_h, size), bilinear_matrix(crop_w, size)  # (size, crop_h), (size, crop_w)
    return rows @ x @ cols.T  # (F, 3, size, size)


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float32 (n_out, n_in): triangle filter of radius max(n_in / n_out, 1) around each output pixel centre,
    renormalised at the borders (PIL / torch antialiased bilinear; plain bilinear when enlarging)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale  # (n_out,) in input pixel units
    w = np.clip(1 - np.abs(np.arange(n_in)[None] + 0.5 - centres[:, None]) / support, 0, None)  # (n_out, n_in)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def normalize_video(video: np.ndarray) -> np.ndarray:
    """[0, 1] RGB float32 (F, 3, S, S) -> ImageNet mean/std."""
    mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return (video - mean) / std


# ----------------------------------------------------------------------------------------------------------
# audio transforms (method.md §7.2, the authors' transforms/audio.py Noise)


def add_fbank_noise(fbank: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """fbank + U(0,1)·r/10 element-wise, r ~ U(0,1) drawn once per clip.  fbank: float32 (T, M) normalised."""
    noise = torch.rand(fbank.shape, generator=generator).numpy()  # (T, M)
    r = float(torch.rand((), generator=generator))
    return fbank + noise * np.float32(r / 10)


def roll_time(fbank: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Circular roll along time by an integer in [-T, T-1].  fbank: (T, M)."""
    T = fbank.shape[0]
    shift = int(torch.randint(-T, T, (), generator=generator))
    return np.roll(fbank, shift, axis=0)


# ----------------------------------------------------------------------------------------------------------
# the Dataset


class AVDataset(Dataset):
    """Clips of `split` whose task is in `tasks` (None = every task), in manifest order.

    train=True applies the training sampling and augmentations of the recipe (data.train_noise,
    data.train_time_roll, data.multiscale_crop); train=False is deterministic (middle window, resize).
    """

    def __init__(self, cfg: DataConfig, split: str, tasks: list[str] | None = None, *, train: bool,
                 seed: int = 0):
        self.cfg, self.split, self.train, self.seed = cfg, split, train, seed
        self.meta = check_prepared(cfg, (split,))
        self.root = Path(cfg.root)
        self.spec = spec_from_meta(self.meta)
        self.task_names: list[str] = list(self.meta["tasks"])
        wanted = self.task_names if tasks is None else list(tasks)
        unknown = [t for t in wanted if t not in self.task_names]
        if unknown:
            raise StellaError(f"tasks {unknown} are not in {self.root / 'meta.json'} (tasks: {self.task_names})")
        self.records = [r for r in read_manifest(self.root, split) if r["task"] in wanted]
        status = open_array(self.root / "cache" / split / "status.npy", self.root)
        not_done = [r["clip_id"] for r in self.records if status[r["row"]] != DONE]
        if not_done:
            raise StellaError(f"{self.root / f'{split}.csv'}: {len(not_done)} clips are not in the cache "
                              f"(e.g. {not_done[0]}); run `{prep_command_of(self.root, cfg.dataset)}` again")
        self.labels = torch.tensor([r["label"] for r in self.records], dtype=torch.long)  # (N,)
        self.tasks = torch.tensor([self.task_names.index(r["task"]) for r in self.records], dtype=torch.long)
        self.epoch = 0
        self._reader: SplitReader | None = None  # opened lazily, once per DataLoader worker

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Training augmentation of item i in this epoch comes from (seed, epoch, i)."""
        self.epoch = epoch

    @property
    def reader(self) -> SplitReader:
        if self._reader is None:
            self._reader = SplitReader(self.root, self.split, self.spec)
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}  # memmaps are re-opened in the worker, never pickled

    def item_generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        """The Generator of item `index` in `epoch` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        state = np.random.SeedSequence([self.seed % 2**64, epoch, index]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & (2**63 - 1))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rec = self.records[index]
        g = self.item_generator(index) if self.train else None
        video = self.load_video(rec["row"], g)
        audio = self.load_audio(rec["row"], g)
        return {"video": video, "audio": audio, "label": self.labels[index], "task": self.tasks[index],
                "index": torch.tensor(index, dtype=torch.long)}

    def sample_frames(self, generator: torch.Generator | None) -> np.ndarray:
        """Cached frame indices: uniform start in training (generator given), the middle at evaluation."""
        F, stride, N = self.cfg.num_frames, self.cfg.frame_stride, self.spec.num_frames
        if generator is None:
            start = eval_start(N, F, stride)
        else:
            starts = window_starts(N, F, stride)
            start = starts[_randint(len(starts), generator)]
        return frame_indices(start, F, stride)

    def load_video(self, row: int, generator: torch.Generator | None) -> Tensor:
        """(F, 3, S, S) float32, ImageNet-normalised.

        The work runs in numpy: these small arrays gain nothing from torch's intra-op threads, which thrash when
        the training loop (num_workers=0) or other processes keep the cores busy (10x slower items).
        """
        idx = self.sample_frames(generator)
        frames = self.reader.frames(row, idx)  # (F, H, W, 3) uint8
        H, W = frames.shape[1:3]
        if generator is not None and self.cfg.multiscale_crop:
            left, top, cw, ch = multiscale_crop_box(W, H, self.cfg.image_size, generator)
        else:
            left, top, cw, ch = 0, 0, W, H
        video = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32) / 255  # (F, 3, H, W)
        video = resized_crop(video, left, top, cw, ch, self.cfg.image_size)  # (F, 3, S, S)
        return torch.from_numpy(np.ascontiguousarray(normalize_video(video)))

    def load_audio(self, row: int, generator: torch.Generator | None) -> Tensor:
        """(1, T, M) float32, normalised; noise and roll in training."""
        fbank = self.reader.fbank(row)  # (T, M) float32
        fbank = (fbank - np.float32(self.cfg.fbank_mean)) / np.float32(self.cfg.fbank_std)
        if generator is not None and self.cfg.train_noise:
            fbank = add_fbank_noise(fbank, generator)
        if generator is not None and self.cfg.train_time_roll:
            fbank = roll_time(fbank, generator)
        return torch.from_numpy(np.ascontiguousarray(fbank)).unsqueeze(0)  # (1, T, M)

    # ground truth of the synthetic benchmark (None for real data)

    def boxes(self, index: int) -> np.ndarray | None:
        """float32 (F_cache, 4) box of the sounding object per cached frame, x0, y0, x1, y1 in [0, 1]."""
        return self.reader.boxes(self.records[index]["row"])

    def event(self, index: int) -> tuple[float, float] | None:
        """(start, end) seconds during which the clip's category is audible."""
        rec = self.records[index]
        return None if rec["event_start"] is None else (rec["event_start"], rec["event_end"])


def _randint(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (), generator=generator))


# ----------------------------------------------------------------------------------------------------------
# loader: deterministic order, DistributedSampler-style sharding, resume mid-epoch


def shard_indices(n: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """The dataset positions rank `rank` visits in `epoch`, as torch's DistributedSampler orders them.

    Order: randperm(n) from a Generator seeded with seed + epoch (or 0..n-1).  drop_last cuts the tail so every
    rank gets floor(n / world_size) items; otherwise the order is padded with its own head to ceil(n / world).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if drop_last and n % world_size:
        per_rank = math.ceil((n - world_size) / world_size)
    else:
        per_rank = math.ceil(n / world_size)
    total = per_rank * world_size
    if total > len(order):
        pad = total - len(order)
        order += (order * math.ceil(pad / max(len(order), 1)))[:pad]
    else:
        order = order[:total]
    return order[rank:total:world_size]


def num_batches(n: int, batch_size: int, *, drop_last: bool, world_size: int = 1) -> int:
    """Batches per epoch on each rank."""
    per_rank = len(shard_indices(n, shuffle=False, seed=0, epoch=0, drop_last=drop_last, world_size=world_size))
    return _count_batches(per_rank, batch_size, drop_last)


def _count_batches(num_items: int, batch_size: int, drop_last: bool) -> int:
    return num_items // batch_size if drop_last else math.ceil(num_items / batch_size)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch on one rank, from batch `start_batch` on (resume mid-epoch)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.indices = shard_indices(n, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last, rank=rank,
                                     world_size=world_size)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.total = _count_batches(len(self.indices), batch_size, drop_last)
        if not 0 <= start_batch <= self.total:
            raise ValueError(f"start_batch={start_batch} outside the {self.total} batches of this epoch")
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start_batch, self.total):
            yield self.indices[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.total - self.start_batch


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack item dicts into a batch with a leading B (numpy's stack: see AVDataset.load_video on threads)."""
    return {k: torch.from_numpy(np.stack([item[k].numpy() for item in items])) for k in items[0]}


def build_loader(dataset: AVDataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool,
                 num_workers: int, rank: int = 0, world_size: int = 1, start_batch: int = 0) -> DataLoader:
    """A DataLoader over one epoch: order from (seed, epoch), sharded by rank, starting at batch `start_batch`.

    Training uses shuffle=True, drop_last=True (the authors' DistributedSampler + ResumableBatchSampler).
    """
    dataset.set_epoch(epoch)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                drop_last=drop_last, rank=rank, world_size=world_size, start_batch=start_batch)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=False,
                      collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed + epoch))  # keeps the global RNG untouched
