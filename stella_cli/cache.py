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
parent process has set its status. A file cut short (a copy interrupted by a full disk) is named with its expected
and actual size and the `stella prep` command that rebuilds it (`open_array`); that command brings the file back to
its size and prepares again the rows it lost (`open_or_create`). `check_folder` is `stella prep --check`.
"raw" frames are fastest to read; "jpeg" is about 5x smaller on disk (80 frames of 256x256 take 15.7 MB raw per
clip), which is what a full VGGSound / AudioSet cache needs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import av
import numpy as np

from stella_cli.console import log
from stella_cli.errors import StellaError
from stella_cli.files import atomic_write_bytes, atomic_write_text, make_dir, reserve, size_text, write_failures

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
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise StellaError(f"{path}: damaged, not JSON ({str(err)[:80]}); rebuild it with "
                          f"`{prep_command_of(root)}`") from None
    if not isinstance(meta, dict) or not {"dataset", "tasks", "classes", "spec"} <= set(meta):
        raise StellaError(f"{path}: not a meta.json of `stella prep` (no dataset, tasks, classes and spec)")
    return meta


PREP_TEMPLATES = {  # where no meta.json records the inputs
    "synthetic": "stella prep synthetic --out {root}",
    "vggsound": "stella prep vggsound --list LIST --root CLIPS --categories stat.csv --out {root}",
    "audioset": "stella prep audioset --list LIST --root CLIPS --categories CLASS_TABLE --out {root}",
}


def prep_command_of(root: Path, dataset: str | None = None) -> str:
    """The `stella prep` command that makes the prepared folder `root`, or finishes or repairs it: from the inputs
    its meta.json records, else a template for `dataset` with the inputs as placeholders."""
    root = Path(root)
    try:
        meta = json.loads((root / "meta.json").read_text())
        src, spec, dataset = meta.get("sources") or {}, meta.get("spec") or {}, meta["dataset"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        template = PREP_TEMPLATES.get(dataset, "stella prep {dataset} --out {root}")
        return template.format(root=root, dataset=dataset or "DATASET")
    args: list[str] = []
    lists = src.get("lists")
    if dataset == "synthetic":
        if root.name == "heldout" and (root.parent / "meta.json").is_file():  # written by the benchmark's prep
            return prep_command_of(root.parent)
        generator = meta.get("generator") or {}
        args += ["--seed", str(generator["seed"])] if generator.get("seed") else []
        args += ["--format", "mp4"] if generator.get("format") == "mp4" else []
        args += [] if (root / "heldout" / "meta.json").is_file() else ["--no-heldout"]
    elif "audioset20k" in src:  # prep_init's two sources
        dataset, src = "audioset20k", src["audioset20k"]
        lists = src.get("lists")
    if isinstance(lists, dict):  # SPLIT=FILE as the dataset's --list takes it (MSR-VTT's test list is its retrieval)
        parts = {"test" if dataset == "msrvtt" and split == "retrieval" else split: file for split, file in lists.items()}
        if dataset == "ave" and src.get("annotations"):
            parts["annotations"] = src["annotations"]
        args += ["--list", ",".join(f"{split}={file}" for split, file in parts.items())]
    elif dataset == "ave":  # a folder of AVE's files
        args += ["--list", src.get("annotations", "")]
    if dataset == "avs":
        args += ["--list", src.get("csv", ""), "--masks", src.get("masks", "")]
    for key in ("root", "categories", "labels"):
        if src.get(key):
            args += [f"--{key}", str(src[key])]
    if src.get("subset") not in (None, "tasks") and dataset != "audioset20k":
        args += ["--subset", src["subset"]]
    if src.get("allow_leaks"):
        args.append("--allow-leaks")
    if spec.get("frames_format") == "jpeg":
        args += ["--frames-format", "jpeg"]
    if dataset == "audioset20k":  # the prepared VGGSound task split is not recorded
        args += ["--vggsound", "VGGSOUND_DIR"]
    return " ".join(["stella", "prep", dataset, *map(shlex.quote, args), "--out", shlex.quote(str(root))])


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
        if spec.frames_format not in ("raw", "jpeg"):
            raise StellaError(f"frames_format must be 'raw' or 'jpeg', got {spec.frames_format!r}")
        make_dir(self.dir)
        arrays = split_arrays(spec, num_clips, boxes=with_boxes)
        # status.npy first: a damaged file among the others marks the rows it lost pending in it
        self.status = open_or_create(self.dir / "status.npy", *arrays.pop("status.npy"))
        opened = {name: open_or_create(self.dir / name, dtype, shape, status=self.status)
                  for name, (dtype, shape) in arrays.items()}
        self.fbank, self.boxes = opened["fbank.npy"], opened.get("boxes.npy")
        self.frames, self.offsets = opened.get("frames.npy"), opened.get("jpeg_offsets.npy")
        if spec.frames_format == "jpeg":
            make_dir(self.dir / "jpeg")

    def pending_rows(self) -> list[int]:
        """Rows not yet done: failed rows are retried on a re-run, and so is a done row whose JPEG file is missing
        or shorter than its offsets say (cut short)."""
        if self.offsets is not None:
            for row in np.flatnonzero(np.asarray(self.status) == DONE):
                blob = self.dir / "jpeg" / f"{row}.bin"
                if not blob.is_file() or blob.stat().st_size != self.offsets[row, -1]:
                    self.status[row] = PENDING
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


def open_or_create(path: Path, dtype: Any, shape: tuple[int, ...], status: np.ndarray | None = None) -> np.memmap:
    """A memory-mapped .npy of this dtype and shape: the existing one (a resumed prep) or a new zeroed one.

    An existing file cut short (a full disk, an interrupted copy) is brought back to its size and the rows it lost
    are marked pending in `status` (the split's status.npy; None when `path` is status.npy itself), so this prep
    writes them again; a status.npy cut short, or a file whose header is gone, is made anew and every row of the
    split is prepared again."""
    dtype = np.dtype(dtype)
    if path.exists():
        damage = npy_damage(path)
        if damage is None:
            arr = np.load(path, mmap_mode="r+")
            if arr.shape != shape or arr.dtype != dtype:
                raise StellaError(f"{path}: existing cache has {arr.dtype} {arr.shape}, expected {dtype} {shape}"
                                  " (different source list or settings; use a new --out folder)")
            return arr
        return repair_array(path, dtype, shape, damage, status)
    return create_array(path, dtype, shape)


def repair_array(path: Path, dtype: np.dtype, shape: tuple[int, ...], damage: str,
                 status: np.ndarray | None) -> np.memmap:
    """open_or_create of a damaged file: extend it to its size (its whole rows are kept), or make it anew."""
    try:
        old_dtype, old_shape, header, size = npy_layout(path)
    except (ValueError, EOFError, OSError):
        old_dtype, old_shape, header = None, None, 0
    if status is not None and old_dtype == dtype and old_shape == shape:
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        first_lost = min(shape[0], max(0, path.stat().st_size - header) // row_bytes)
        with write_failures(path, needs=size):
            os.truncate(path, size)
        arr = np.load(path, mmap_mode="r+")
    else:
        first_lost = 0
        path.unlink()
        arr = create_array(path, dtype, shape)
    if status is not None:  # (a new status.npy is all zeros: every row pending)
        status[first_lost:] = PENDING
        status.flush()
    lost = shape[0] - first_lost
    log(f"[yellow]{path}: damaged ({damage}); " + (f"its last {lost} of {shape[0]} rows are prepared again" if lost
                                                     else "brought back to its size, no row lost"))
    return arr


def create_array(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new zeroed .npy, memory-mapped, its disk space taken now (files.reserve): a full disk stops the prep here
    in one line saying how much the file needs, and the partial file is removed."""
    with write_failures(path, partial=path, needs=math.prod(shape) * dtype.itemsize):
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        with open(path, "r+b") as fh:
            reserve(fh, path.stat().st_size)
    return arr


# ----------------------------------------------------------------------------------------------------------
# the arrays of a split, and damaged ones (a copy or a write cut short)


def split_arrays(spec: CacheSpec, num_clips: int, *, boxes: bool = False) -> dict[str, tuple[np.dtype, tuple]]:
    """The memory-mapped arrays of one split: {file name: (dtype, shape)} (see the module docstring)."""
    F, S, T, M, N = spec.num_frames, spec.frame_size, spec.target_length, spec.num_mel_bins, num_clips
    arrays = {"status.npy": (np.dtype(np.uint8), (N,)), "fbank.npy": (np.dtype(np.float16), (N, T, M))}
    if spec.frames_format == "raw":
        arrays["frames.npy"] = (np.dtype(np.uint8), (N, F, S, S, 3))
    else:
        arrays["jpeg_offsets.npy"] = (np.dtype(np.int64), (N, F + 1))
    if boxes:
        arrays["boxes.npy"] = (np.dtype(np.float32), (N, F, 4))
    return arrays


def npy_layout(path: Path) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, header bytes, bytes the whole file has) of a .npy file, from its header; ValueError when the
    file is too short to hold one."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
        header = fh.tell()
    return dtype, tuple(shape), header, header + math.prod(shape) * dtype.itemsize


def npy_damage(path: Path) -> str | None:
    """What is wrong with a .npy file ('1,000 bytes, expected 2,000 (float16 (4, 250)): cut short, ...'), None when
    it is whole."""
    size = Path(path).stat().st_size
    try:
        dtype, shape, _, expected = npy_layout(path)
    except (ValueError, EOFError, OSError) as err:
        return f"{size:,} bytes, not a whole .npy file: {str(err).splitlines()[0][:80]}"
    if size != expected:
        why = "cut short, by a full disk or an interrupted copy?" if size < expected else "longer than its header says"
        return f"{size:,} bytes, expected {expected:,} ({dtype} {shape}): {why}"
    return None


def damaged(path: Path, root: Path, damage: str) -> StellaError:
    return StellaError(f"{path}: damaged feature cache ({damage}); rebuild it with `{prep_command_of(root)}`")


def open_array(path: Path, root: Path) -> np.memmap:
    """A cached array of the prepared folder `root`, memory-mapped read-only; a missing or damaged file is one line
    naming it, its size and the `stella prep` command that rebuilds it (not numpy's 'mmap length is greater than
    file size')."""
    path = Path(path)
    damage = "missing" if not path.is_file() else npy_damage(path)
    if damage:
        raise damaged(path, root, damage)
    return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------------------------------------------------
# reading


class SplitReader:
    """Random access to one split's cache; cheap to open in every DataLoader worker."""

    def __init__(self, root: Path, split: str, spec: CacheSpec):
        self.root, self.dir, self.spec = Path(root), Path(root) / "cache" / split, spec
        if not (self.dir / "fbank.npy").is_file():
            raise StellaError(f"{self.dir}: no feature cache for split {split!r} (run `stella prep` first)")
        self.fbank_arr = open_array(self.dir / "fbank.npy", root)
        boxes = self.dir / "boxes.npy"
        self.boxes_arr = open_array(boxes, root) if boxes.is_file() else None
        if spec.frames_format == "raw":
            self.frames_arr = open_array(self.dir / "frames.npy", root)
        else:
            self.offsets = open_array(self.dir / "jpeg_offsets.npy", root)

    def jpeg_file(self, row: int) -> tuple[Path, str | None]:
        """A row's JPEG file and what is wrong with it (None: whole)."""
        path, expected = self.dir / "jpeg" / f"{row}.bin", int(self.offsets[row, -1])
        size = path.stat().st_size if path.is_file() else None
        return path, None if size == expected else f"{size:,} bytes, expected {expected:,}" if size is not None \
            else "missing"

    def check_rows(self, rows: Iterable[int]) -> None:
        """The JPEG files of these rows are whole (the arrays were checked when opened): one line naming the first
        that is not, here, rather than a traceback from a DataLoader worker later."""
        for row in rows if self.spec.frames_format == "jpeg" else ():
            path, damage = self.jpeg_file(row)
            if damage:
                raise damaged(path, self.root, damage)

    def fbank(self, row: int) -> np.ndarray:
        """(target_length, num_mel_bins) float32, un-normalised."""
        return np.asarray(self.fbank_arr[row], dtype=np.float32)

    def frames(self, row: int, indices: list[int] | np.ndarray) -> np.ndarray:
        """uint8 (len(indices), S, S, 3) RGB frames of clip `row` at cache frame `indices`."""
        if self.spec.frames_format == "raw":
            return np.asarray(self.frames_arr[row, np.asarray(indices)])
        path, damage = self.jpeg_file(row)
        if damage:
            raise damaged(path, self.root, damage)
        blob, off = path.read_bytes(), self.offsets[row]
        return np.stack([decode_jpeg(blob[off[i]:off[i + 1]]) for i in indices])

    def boxes(self, row: int) -> np.ndarray | None:
        return None if self.boxes_arr is None else np.asarray(self.boxes_arr[row])


# ----------------------------------------------------------------------------------------------------------
# `stella prep --check`


def check_folder(root: Path) -> tuple[list[list[str]], list[str]]:
    """A prepared folder checked against itself, changing nothing: every split's cache files whole and of the shapes
    meta.json's spec gives, every manifest row in the cache and done (and its JPEG file whole), every done row in
    the manifest, every row's class, labels and task in meta.json. Returns (one table row per split: split, clips,
    cache rows, done, failed, pending, size on disk) and the problems, one line each."""
    root = Path(root)
    try:
        meta = read_meta(root)
        spec = spec_from_meta(meta)
    except StellaError as err:
        return [], [str(err)]
    except TypeError as err:
        return [], [f"{root / 'meta.json'}: spec: {err}"]
    table, problems = [], []
    for split in meta.get("splits") or SPLITS:
        try:
            row, found = check_split(root, split, spec, meta)
        except StellaError as err:  # a manifest that cannot be read
            row, found = [split, "?", "?", "?", "?", "?", "?"], [str(err)]
        table.append(row)
        problems += found
    return table, problems


def check_split(root: Path, split: str, spec: CacheSpec, meta: dict[str, Any]) -> tuple[list[str], list[str]]:
    """check_folder for one split: its table row and its problems."""
    folder, csv_path, status_path = root / "cache" / split, root / f"{split}.csv", root / "cache" / split / "status.npy"
    manifest = read_manifest(root, split) if csv_path.is_file() else None
    damage = "missing" if not status_path.is_file() else npy_damage(status_path)
    status = None if damage else np.load(status_path, mmap_mode="r")
    size = size_text(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
    counts = [str(c) for c in np.bincount(np.asarray(status), minlength=3)[[DONE, FAILED, PENDING]]] if damage is None \
        else ["-"] * 3
    row = [split, "-" if manifest is None else str(len(manifest)), "-" if status is None else str(len(status)),
           *counts, size]
    if manifest is None or status is None:
        return row, ([] if manifest else [f"{csv_path}: missing (the prep did not finish)"]) + \
            ([f"{status_path}: {damage}"] if damage else [])
    n, problems = len(status), []
    arrays = split_arrays(spec, n, boxes=(folder / "boxes.npy").is_file())
    for name, (dtype, shape) in arrays.items():
        path = folder / name
        damage = "missing" if not path.is_file() else npy_damage(path)
        if damage is None and npy_layout(path)[:2] != (dtype, shape):
            damage = f"{npy_layout(path)[0]} {npy_layout(path)[1]}, expected {dtype} {shape} (meta.json's spec)"
        if damage:
            problems.append(f"{path}: {damage}")
    classes = {c.get("index"): c for c in meta["classes"]}

    def note(rows: list[dict[str, Any]], what: str) -> None:
        if rows:
            problems.append(f"{csv_path}: {what}: {len(rows)} (e.g. {rows[0]['clip_id']}, row {rows[0]['row']})")

    inside = [r for r in manifest if 0 <= r["row"] < n]
    note([r for r in manifest if not 0 <= r["row"] < n], f"clips outside the {n} rows of {folder}")
    note([r for r in inside if status[r["row"]] != DONE], f"clips not done in {status_path}")
    seen: set[int] = set()
    note([r for r in manifest if r["row"] in seen or seen.add(r["row"])], "clips on the cache row of an earlier clip")
    extra = sorted(set(np.flatnonzero(np.asarray(status) == DONE).tolist()) - seen)
    if extra:
        problems.append(f"{status_path}: {len(extra)} done rows are not in {csv_path} (e.g. row {extra[0]}; the prep "
                        "stopped before it wrote the manifest?)")
    note([r for r in manifest if r["label"] not in classes or any(k not in classes for k in r["labels"])],
         f"clips of a class not in {root / 'meta.json'}")
    note([r for r in manifest if r["task"] not in meta["tasks"]], f"clips of a task not in {root / 'meta.json'}")
    note([r for r in manifest if r["label"] in classes and classes[r["label"]].get("task", r["task"]) != r["task"]],
         f"clips of another task than their class in {root / 'meta.json'}")
    offsets = folder / "jpeg_offsets.npy"
    if spec.frames_format == "jpeg" and not any(p.startswith(f"{offsets}:") for p in problems):
        ends = np.load(offsets, mmap_mode="r")[:, -1]

        def cut(row: int) -> bool:
            blob = folder / "jpeg" / f"{row}.bin"
            return not blob.is_file() or blob.stat().st_size != ends[row]

        note([r for r in inside if status[r["row"]] == DONE and cut(r["row"])],
             f"clips whose JPEG file in {folder / 'jpeg'} is missing or cut short")
    return row, problems


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
