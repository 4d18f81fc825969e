"""The prepared-data layout that `stella prep` writes and the Dataset reads.

One layout for real clips and the synthetic benchmark, so the synthetic path exercises the real one:

    DATA_DIR/
      meta.json                       dataset, ordered tasks, classes, cache settings (CacheSpec)
      {split}.csv                     manifest: one row per usable clip (see MANIFEST_COLUMNS)
      prep_report.json                clips skipped per split, with the reason for each
      cache/{split}/fbank.npy         float16 (N, target_length, num_mel_bins) Kaldi log-mel, NOT normalised
      cache/{split}/frames.npy        uint8 (N, F, S, S, 3) RGB frames               (frames_format "raw")
      cache/{split}/jpeg/{row}.bin    the F frames of a clip as concatenated JPEGs     (frames_format "jpeg")
      cache/{split}/jpeg_offsets.npy  int64 (N, F + 1) byte offsets into {row}.bin     (frames_format "jpeg")
      cache/{split}/boxes.npy         float32 (N, F, 4) ground-truth source box (x0, y0, x1, y1) in [0, 1], optional
      cache/{split}/status.npy        uint8 (N,) per row: 0 pending, 1 done, 2 failed

Rows are allocated up front (N = clips in the source list), so parallel workers write their own rows into
memory-mapped arrays and a re-run resumes: a row counts as done only once its data has been flushed and the
parent process has set its status. "raw" frames are fastest to read; "jpeg" is about 5x smaller on disk
(80 frames of 256x256 take 15.7 MB raw per clip), which is what a full VGGSound / AudioSet cache needs.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import av
import numpy as np

from stella_cli.errors import StellaError
from stella_cli.files import atomic_write_bytes, atomic_write_text, make_dir, reserve, write_failures

SPLITS = ("train", "test", "retrieval")
PENDING, DONE, FAILED = 0, 1, 2
MANIFEST_COLUMNS = ["clip_id", "row", "label", "labels", "category", "task", "duration", "source",
                    "event_start", "event_end"]


@dataclass(frozen=True)
class CacheSpec:
    """What one cached clip holds. Real clips: 80 frames (8 fps x 10 s) of 256x256 and a 1024x128 fbank."""

    num_frames: int = 80  # F frames per clip (method.md §7.1: indices floor(i*N/80), N = min(count, 10*fps))
    frame_size: int = 256  # S: short side resized to S, then centre-cropped to S x S
    fps: float = 8.0  # frames per second of the cache
    clip_seconds: float = 10.0
    sample_rate: int = 16000
    target_length: int = 1024  # fbank frames after pad/cut
    num_mel_bins: int = 128
    frames_format: str = "raw"  # raw | jpeg


# ----------------------------------------------------------------------------------------------------------
# meta.json and manifests


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    """meta.json: {'dataset', 'tasks': [...], 'classes': [{'index','name','category','task'}], 'spec': {...}}."""
    atomic_write_text(Path(root) / "meta.json", json.dumps(meta, indent=2))


def read_meta(root: Path) -> dict[str, Any]:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise StellaError(f"{path}: no prepared data here (run `stella prep` first)")
    return json.loads(path.read_text())


def spec_from_meta(meta: dict[str, Any]) -> CacheSpec:
    return CacheSpec(**meta["spec"])


def spec_to_dict(spec: CacheSpec) -> dict[str, Any]:
    return asdict(spec)


def write_manifest(root: Path, split: str, rows: Iterable[dict[str, Any]]) -> Path:
    """One CSV per split; `labels` is ';'-joined class indices, `event_*` are seconds or empty."""
    path = Path(root) / f"{split}.csv"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in MANIFEST_COLUMNS})
    atomic_write_text(path, text.getvalue())
    return path


def read_manifest(root: Path, split: str) -> list[dict[str, Any]]:
    path = Path(root) / f"{split}.csv"
    if not path.is_file():
        raise StellaError(f"{path}: no manifest for split {split!r} (run `stella prep` first)")
    out = []
    with open(path, newline="") as fh:
        for line_no, rec in enumerate(csv.DictReader(fh), start=2):
            try:
                rec["row"] = int(rec["row"])
                rec["label"] = int(rec["label"])
                rec["labels"] = [int(x) for x in rec["labels"].split(";") if x != ""]
                rec["duration"] = float(rec["duration"]) if rec["duration"] else 0.0
                for k in ("event_start", "event_end"):
                    rec[k] = float(rec[k]) if rec.get(k) else None
            except (KeyError, ValueError) as err:
                raise StellaError(f"{path}:{line_no}: malformed manifest row: {err}") from err
            out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------
# writing


class SplitWriter:
    """Pre-allocated, resumable feature cache of one split. Open in every worker; rows are independent."""

    def __init__(self, root: Path, split: str, num_clips: int, spec: CacheSpec, with_boxes: bool = False):
        self.dir = Path(root) / "cache" / split
        self.spec = spec
        make_dir(self.dir)
        F, S, T, M = spec.num_frames, spec.frame_size, spec.target_length, spec.num_mel_bins
        self.status = open_or_create(self.dir / "status.npy", np.uint8, (num_clips,))
        self.fbank = open_or_create(self.dir / "fbank.npy", np.float16, (num_clips, T, M))
        self.boxes = open_or_create(self.dir / "boxes.npy", np.float32, (num_clips, F, 4)) if with_boxes else None
        if spec.frames_format == "raw":
            self.frames = open_or_create(self.dir / "frames.npy", np.uint8, (num_clips, F, S, S, 3))
        elif spec.frames_format == "jpeg":
            self.offsets = open_or_create(self.dir / "jpeg_offsets.npy", np.int64, (num_clips, F + 1))
            make_dir(self.dir / "jpeg")
        else:
            raise StellaError(f"frames_format must be 'raw' or 'jpeg', got {spec.frames_format!r}")

    def pending_rows(self) -> list[int]:
        """Rows not yet done (failed rows are retried on a re-run)."""
        return [int(i) for i in np.flatnonzero(np.asarray(self.status) != DONE)]

    def write(self, row: int, frames: np.ndarray, fbank: np.ndarray, boxes: np.ndarray | None = None) -> None:
        """Store one clip's data and flush it to disk; `mark` it done afterwards (parent process)."""
        F, S = self.spec.num_frames, self.spec.frame_size
        if frames.shape != (F, S, S, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 {(F, S, S, 3)}, got {frames.dtype} {frames.shape}")
        if fbank.shape != (self.spec.target_length, self.spec.num_mel_bins):
            raise ValueError(f"fbank must be {(self.spec.target_length, self.spec.num_mel_bins)}, got {fbank.shape}")
        self.fbank[row] = fbank.astype(np.float16)
        self.fbank.flush()
        if self.spec.frames_format == "raw":
            self.frames[row] = frames
            self.frames.flush()
        else:
            blobs = [encode_jpeg(f) for f in frames]
            self.offsets[row] = np.cumsum([0] + [len(b) for b in blobs])
            self.offsets.flush()
            atomic_write_bytes(self.dir / "jpeg" / f"{row}.bin", b"".join(blobs))
        if self.boxes is not None and boxes is not None:
            self.boxes[row] = boxes
            self.boxes.flush()

    def mark(self, row: int, state: int) -> None:
        self.status[row] = state

    def flush(self) -> None:
        self.status.flush()


def open_or_create(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A memory-mapped .npy of this dtype and shape: the existing one (a resumed prep) or a new zeroed one."""
    if path.exists():
        arr = np.load(path, mmap_mode="r+")
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise StellaError(f"{path}: existing cache has {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}"
                              " (different source list or settings; use a new --out folder)")
        return arr
    return create_array(path, np.dtype(dtype), shape)


def create_array(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new zeroed .npy, memory-mapped, its disk space taken now (files.reserve): a full disk stops the prep here
    in one line saying how much the file needs, and the partial file is removed."""
    with write_failures(path, partial=path, needs=math.prod(shape) * dtype.itemsize):
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        with open(path, "r+b") as fh:
            reserve(fh, path.stat().st_size)
    return arr


# ----------------------------------------------------------------------------------------------------------
# reading


class SplitReader:
    """Random access to one split's cache; cheap to open in every DataLoader worker."""

    def __init__(self, root: Path, split: str, spec: CacheSpec):
        self.dir = Path(root) / "cache" / split
        self.spec = spec
        if not (self.dir / "fbank.npy").is_file():
            raise StellaError(f"{self.dir}: no feature cache for split {split!r} (run `stella prep` first)")
        self.fbank_arr = np.load(self.dir / "fbank.npy", mmap_mode="r")
        boxes = self.dir / "boxes.npy"
        self.boxes_arr = np.load(boxes, mmap_mode="r") if boxes.is_file() else None
        if spec.frames_format == "raw":
            self.frames_arr = np.load(self.dir / "frames.npy", mmap_mode="r")
        else:
            self.offsets = np.load(self.dir / "jpeg_offsets.npy", mmap_mode="r")

    def fbank(self, row: int) -> np.ndarray:
        """(target_length, num_mel_bins) float32, un-normalised."""
        return np.asarray(self.fbank_arr[row], dtype=np.float32)

    def frames(self, row: int, indices: list[int] | np.ndarray) -> np.ndarray:
        """uint8 (len(indices), S, S, 3) RGB frames of clip `row` at cache frame `indices`."""
        if self.spec.frames_format == "raw":
            return np.asarray(self.frames_arr[row, np.asarray(indices)])
        blob = (self.dir / "jpeg" / f"{row}.bin").read_bytes()
        off = self.offsets[row]
        return np.stack([decode_jpeg(blob[off[i]:off[i + 1]]) for i in indices])

    def boxes(self, row: int) -> np.ndarray | None:
        return None if self.boxes_arr is None else np.asarray(self.boxes_arr[row])


# ----------------------------------------------------------------------------------------------------------
# JPEG through PyAV's mjpeg codec (libjpeg), so no image library is needed


def encode_jpeg(rgb: np.ndarray, qscale: int = 2) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes (qscale 2 = high quality)."""
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj444p"
    ctx.options = {"qscale": str(qscale)}
    ctx.flags |= av.codec.context.Flags.qscale
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj444p")
    packets = ctx.encode(frame) + ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


def decode_jpeg(data: bytes) -> np.ndarray:
    ctx = av.CodecContext.create("mjpeg", "r")
    frames = ctx.decode(av.Packet(data))
    return frames[0].to_ndarray(format="rgb24")



def disk_bytes(root: Path) -> int:
    """Total size of the files under root (the prep summary's "size on disk")."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
