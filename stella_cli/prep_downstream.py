"""`stella prep ave|avs|msrvtt`: the downstream datasets' annotation files -> the prepared-data layout of cache.py.

AVE (Tian et al. 2018): `Annotations.txt`, `trainSet.txt`, `testSet.txt` (and `valSet.txt`), one video a line,
'&'-separated: category & video id & quality & start second & end second (Annotations.txt opens with a header
line). A video's event is [start, end); its 10 one-second segments are labelled by the event's category or
background (ave.py). Videos are found by file stem under --root; a listed video with no file, no audio or an
unreadable file is skipped and reported (prep_report.json), as for `stella prep vggsound`.

AVSBench S4: `s4_meta_data.csv` (name, category, split), a video per name under --root, the first frame's mask
png under --masks; the masks are cached beside the frames (cache/{split}/masks.npy), resized and cropped alike.

MSR-VTT: the train and test lists, one video id a line, or a csv with a `video_id` column (Miech's
MSRVTT_train.9k.csv, the JSFusion test csv MSRVTT_JSFUSION_test.csv); the test list becomes the `retrieval` split.
Videos without audio are skipped and reported, and so are listed videos with no file under --root.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np

from stella_cli.cache import CacheSpec, disk_bytes, spec_to_dict, write_meta
from stella_cli.errors import StellaError
from stella_cli.files import atomic_write_text, make_dir, replacing
from stella_cli.media import resize_geometry
from stella_cli.prep import ClipSource, MediaIndex, ListEntry, prepare_split

AVE_FILES = {"train": "trainSet.txt", "test": "testSet.txt"}


def read_ave_list(path: Path) -> list[dict[str, Any]]:
    """Rows {category, video_id, quality, start, end, where} of an AVE annotation file."""
    path = Path(path)
    if not path.is_file():
        raise StellaError(f"{path}: AVE annotation file not found")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.lower().startswith("category&"):
            continue
        parts = line.split("&")
        if len(parts) != 5:
            raise StellaError(f"{path}:{line_no}: expected category&video_id&quality&start&end, got {line!r}")
        category, video_id, quality, start, end = (p.strip() for p in parts)
        try:
            s, e = float(start), float(end)
        except ValueError:
            raise StellaError(f"{path}:{line_no}: start and end must be seconds, got {start!r}, {end!r}") from None
        if not 0 <= s < e:
            raise StellaError(f"{path}:{line_no}: event [{start}, {end}) is empty or negative")
        rows.append({"category": category, "video_id": video_id, "quality": quality, "start": s, "end": e,
                     "where": f"{path}:{line_no}"})
    return rows


def prepare_ave(out: Path, *, root: Path, annotations: Path | None = None, workers: int = 2,
                frames_format: str = "raw", progress: bool = True, spec: CacheSpec | None = None) -> dict[str, Any]:
    """`stella prep ave`: categories from Annotations.txt (else the split files), train/test from trainSet.txt /
    testSet.txt under `annotations` (default: root); one task "ave"; clips keep their event window."""
    root = Path(root)
    if not root.is_dir():
        raise StellaError(f"--root {root}: folder of AVE videos not found")
    folder = Path(annotations or root)
    lists = {split: read_ave_list(folder / name) for split, name in AVE_FILES.items()}
    everything = read_ave_list(folder / "Annotations.txt") if (folder / "Annotations.txt").is_file() else []
    categories = sorted({r["category"] for r in everything} | {r["category"] for s in lists.values() for r in s})
    index = MediaIndex(root)
    clips, missing = {}, {}
    for split, rows in lists.items():
        clips[split], missing[split] = [], []
        for r in rows:
            path = index.find(ListEntry(r["video_id"], [], [r["video_id"]], r["video_id"], r["where"]))
            if path is None:
                missing[split].append({"clip_id": r["video_id"], "source": r["where"],
                                       "reason": "no media file under --root"})
                continue
            label = categories.index(r["category"])
            clips[split].append(ClipSource(r["video_id"], str(path), label, [label], r["category"], "ave",
                                           event_start=r["start"], event_end=r["end"]))
    classes = [{"index": i, "name": c, "category": c, "task": "ave"} for i, c in enumerate(categories)]
    return write_prepared(out, "ave", ["ave"], classes, clips, missing, spec or CacheSpec(), workers=workers,
                          frames_format=frames_format, progress=progress,
                          sources={"root": str(root), "annotations": str(folder)})


def write_prepared(out: Path, dataset: str, tasks: list[str], classes: list[dict[str, Any]],
                   clips: dict[str, list[ClipSource]], missing: dict[str, list[dict[str, str]]], spec: CacheSpec, *,
                   workers: int, frames_format: str, progress: bool, sources: dict[str, Any],
                   extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode every split (prep.prepare_split), then meta.json and prep_report.json; returns prep's summary."""
    t0 = time.perf_counter()
    out = Path(out)
    spec = replace(spec, frames_format=frames_format)
    make_dir(out)
    write_meta(out, {"dataset": dataset, "tasks": tasks, "splits": list(clips), "spec": spec_to_dict(spec),
                     "classes": classes, "sources": sources, **(extra_meta or {})})
    summary: dict[str, Any] = {"out": str(out), "splits": {}, "skipped": {}, "skipped_clips": {},
                               "report": str(out / "prep_report.json")}
    report: dict[str, Any] = {"dataset": dataset, "warnings": [], "splits": {}}
    for split, items in clips.items():
        res = prepare_split(out, split, items, spec, workers=workers, progress=progress)
        skipped = missing.get(split, []) + res["skipped"]
        counts = {t: res["clips"].get(t, 0) for t in tasks}
        summary["splits"][split] = counts
        summary["skipped"][split] = len(skipped)
        summary["skipped_clips"][split] = skipped
        report["splits"][split] = {"selected": len(items) + len(missing.get(split, [])),
                                   "prepared": sum(counts.values()), "clips": counts, "skipped": skipped}
    atomic_write_text(out / "prep_report.json", json.dumps(report, indent=2))
    summary["seconds"] = time.perf_counter() - t0
    summary["bytes"] = disk_bytes(out)
    return summary


# ----------------------------------------------------------------------------------------------------------
# AVSBench S4


def read_s4_csv(path: Path) -> list[dict[str, Any]]:
    """Rows {name, category, split, where} of AVSBench's s4_meta_data.csv (header name,category,split, any order;
    extra columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise StellaError(f"{path}: AVSBench S4 csv not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        head = [h.strip() for h in reader.fieldnames or []]
        missing = [k for k in ("name", "category", "split") if k not in head]
        if missing:
            raise StellaError(f"{path}:1: header must name name, category and split (missing {missing}), got {head}")
        rows = []
        for line_no, r in enumerate(reader, start=2):
            r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
            if not r["name"] or not r["category"] or r["split"] not in ("train", "val", "test"):
                raise StellaError(f"{path}:{line_no}: expected a name, a category and split train|val|test, got {r}")
            rows.append({**r, "where": f"{path}:{line_no}"})
    return rows


def decode_mask(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size) 0/1 mask from a png (PyAV's png decoder), resized and centre-cropped as the frames are
    (media.resize_geometry), thresholded at half intensity."""
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
    except (av.FFmpegError, OSError, StopIteration) as err:
        raise StellaError(f"{path}: cannot decode the mask png: {err}") from err
    rw, rh, left, top = resize_geometry(frame.width, frame.height, size)
    gray = frame.reformat(width=rw, height=rh, format="gray", interpolation="BILINEAR").to_ndarray()
    return (gray[top:top + size, left:left + size] >= 128).astype(np.uint8)


def prepare_avs(out: Path, *, root: Path, meta_csv: Path, masks: Path, workers: int = 2, frames_format: str = "raw",
                progress: bool = True, spec: CacheSpec | None = None) -> dict[str, Any]:
    """`stella prep avs`: the train and test clips of s4_meta_data.csv, their videos under `root` (by name) and
    their first-frame masks under `masks` ({name}_1.png, as AVSBench's gt_masks/{split}/{category}/{name}/, or
    {name}.png); masks go to cache/{split}/masks.npy, uint8 (N, S, S), aligned with the cached frames."""
    root, masks = Path(root), Path(masks)
    for folder, what in ((root, "videos"), (masks, "mask pngs")):
        if not folder.is_dir():
            raise StellaError(f"{folder}: folder of AVSBench {what} not found")
    rows = read_s4_csv(meta_csv)
    categories = sorted({r["category"] for r in rows})
    pngs = {p.name: p for p in sorted(masks.rglob("*.png"))}
    index = MediaIndex(root)
    spec = spec or CacheSpec(clip_seconds=5.0, num_frames=40)  # S4 clips are 5 s
    clips, missing, mask_files = {}, {}, {}
    for split in ("train", "test"):
        clips[split], missing[split], mask_files[split] = [], [], []
        for r in (r for r in rows if r["split"] == split):
            png = pngs.get(f"{r['name']}_1.png") or pngs.get(f"{r['name']}.png")
            path = index.find(ListEntry(r["name"], [], [r["name"]], r["name"], r["where"]))
            reason = ("no media file under --root" if path is None else
                      "no mask png under --masks" if png is None else None)
            if reason:
                missing[split].append({"clip_id": r["name"], "source": r["where"], "reason": reason})
                continue
            label = categories.index(r["category"])
            clips[split].append(ClipSource(r["name"], str(path), label, [label], r["category"], "avs"))
            mask_files[split].append(png)
    classes = [{"index": i, "name": c, "category": c, "task": "avs"} for i, c in enumerate(categories)]
    summary = write_prepared(out, "avs", ["avs"], classes, clips, missing, spec, workers=workers,
                             frames_format=frames_format, progress=progress,
                             sources={"root": str(root), "csv": str(meta_csv), "masks": str(masks)})
    for split, files in mask_files.items():
        arr = np.zeros((len(files), spec.frame_size, spec.frame_size), np.uint8)
        for row, png in enumerate(files):
            arr[row] = decode_mask(png, spec.frame_size)
        with replacing(Path(out) / "cache" / split / "masks.npy") as fh:
            np.save(fh, arr)
    return summary


# ----------------------------------------------------------------------------------------------------------
# MSR-VTT


MSRVTT_LISTS = {"train": ["MSRVTT_train.9k.csv", "train_list.txt", "train.txt"],
                "retrieval": ["MSRVTT_JSFUSION_test.csv", "test_list.txt", "test.txt"]}


def read_video_list(path: Path) -> list[tuple[str, str]]:
    """[(video id, file:line)] of a list: a csv whose header has `video_id`, or one id per line."""
    path = Path(path)
    if not path.is_file():
        raise StellaError(f"{path}: MSR-VTT list not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    head = [h.strip() for h in next(csv.reader(lines[:1]), [])]
    if "video_id" in head:
        col = head.index("video_id")
        out = []
        for line_no, row in enumerate(csv.reader(lines[1:]), start=2):
            if not row:
                continue
            if len(row) <= col or not row[col].strip():
                raise StellaError(f"{path}:{line_no}: no video_id in column {col + 1}: {row}")
            out.append((row[col].strip(), f"{path}:{line_no}"))
        return out
    out = []
    for line_no, line in enumerate(lines, start=1):
        vid = line.strip()
        if vid:
            if "," in vid or " " in vid:
                raise StellaError(f"{path}:{line_no}: expected one video id a line (or a csv with a video_id "
                                  f"column), got {vid!r}")
            out.append((vid, f"{path}:{line_no}"))
    return out


def prepare_msrvtt(out: Path, *, root: Path, lists: Path, workers: int = 2, frames_format: str = "raw",
                   progress: bool = True, spec: CacheSpec | None = None) -> dict[str, Any]:
    """`stella prep msrvtt`: `lists` is the folder holding the train and test lists under their usual names
    (MSRVTT_LISTS), or `train=FILE,test=FILE`. The test list becomes the `retrieval` split."""
    root = Path(root)
    if not root.is_dir():
        raise StellaError(f"--root {root}: folder of MSR-VTT videos not found")
    files = resolve_msrvtt_lists(lists)
    index = MediaIndex(root)
    clips, missing = {}, {}
    for split, path in files.items():
        clips[split], missing[split], seen = [], [], set()
        for vid, where in read_video_list(path):
            if vid in seen:
                continue
            seen.add(vid)
            media = index.find(ListEntry(vid, [], [vid], vid, where))
            if media is None:
                missing[split].append({"clip_id": vid, "source": where, "reason": "no media file under --root"})
                continue
            clips[split].append(ClipSource(vid, str(media), 0, [0], "msrvtt", "msrvtt"))
    classes = [{"index": 0, "name": "msrvtt", "category": "msrvtt", "task": "msrvtt"}]
    return write_prepared(out, "msrvtt", ["msrvtt"], classes, clips, missing, spec or CacheSpec(), workers=workers,
                          frames_format=frames_format, progress=progress,
                          sources={"root": str(root), "lists": {k: str(v) for k, v in files.items()}})


def resolve_msrvtt_lists(lists: Path | str) -> dict[str, Path]:
    text = str(lists)
    if Path(text).is_dir():
        found = {}
        for split, names in MSRVTT_LISTS.items():
            hit = next((Path(text) / n for n in names if (Path(text) / n).is_file()), None)
            if hit is None:
                raise StellaError(f"{text}: no {split} list (looked for {names})")
            found[split] = hit
        return found
    found = {}
    for part in text.split(","):
        split, sep, file = part.partition("=")
        split = {"test": "retrieval"}.get(split.strip(), split.strip())
        if not sep or split not in MSRVTT_LISTS:
            raise StellaError(f"--list {part}: give train=FILE,test=FILE or a folder holding {MSRVTT_LISTS}")
        found[split] = Path(file.strip())
    if set(found) != set(MSRVTT_LISTS):
        raise StellaError(f"--list {text}: both train= and test= lists are required")
    return found
