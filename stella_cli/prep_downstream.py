"""`stella prep ave|avs|msrvtt`: the downstream datasets' annotation files -> the prepared-data layout of cache.py.

AVE (Tian et al. 2018): `Annotations.txt`, `trainSet.txt`, `testSet.txt` (and `valSet.txt`), one annotation a
line, '&'-separated: category & video id & quality & start second & end second (the release's Annotations.txt may
open with a header line). A video's event is [start, end); its 10 one-second segments are labelled by the event's
category or background (ave.py). A zero-length event (start = end; the release has one) gives an all-background
clip, as the release's own labels do. A video labelled with more than one category (the release has 45, one row
per category) is left out of every split and reported: its segments would carry two labels at once. Videos are
found by file stem under --root; a listed video with no file, no audio or an unreadable file is skipped and
reported (prep_report.json), as for `stella prep vggsound`.

AVSBench S4: `s4_meta_data.csv` (a header naming category and split; the video name is the `name` column, else the
first, as AVSBench's loader reads it), the clips either as videos under --root (by name) or as AVSBench's
processed release under --root (`visual_frames/{split}/{category}/{name}/{name}_{k}.png` at 1 fps +
`audio_wav/{split}/{category}/{name}.wav`), the mask pngs under --masks (default ROOT/gt_masks): the first frame's
for a train video, all five for a test video (S4 scores them all); the masks are cached beside the frames
(cache/{split}/masks.npy). A mask file must hold at most two grey levels (a video frame given as a mask is refused).
AVSBench draws a mask on its 224 x 224 frame, the whole video frame squashed to a square (preprocess_s4.py
`cv2.resize(im, (224, 224))`), so a mask is stretched back to the video's aspect, then resized and centre-cropped
as the frames are. Val rows are counted and not used (the authors train on train and test on test).

MSR-VTT: the train and test lists, one video id a line (the authors' `train_list_miech.txt` /
`test_list_miech.txt`), or a csv whose header has `video_id` (Miech's MSRVTT_train.9k.csv, the JSFusion test csv
MSRVTT_JSFUSION_test.csv), `,`, `;` or tab separated; the test list becomes the `retrieval` split. Videos without
audio are skipped and reported, and so are listed videos with no file under --root.

In every dataset a video listed twice in a split is kept once and reported, and a video in both train and test is
refused unless --allow-leaks (then counted in prep_report.json). Nothing is written before every input is checked.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np

from stella_cli.cache import DONE, CacheSpec, disk_bytes, spec_to_dict, write_meta
from stella_cli.errors import StellaError
from stella_cli.inputs import (MediaIndex, check_leaks, duplicate_note, examples, leak_note, parse_split_files,
                               read_rows, read_text, walk_files)
from stella_cli.files import atomic_write_text, make_dir, replacing
from stella_cli.media import resize_geometry
from stella_cli.prep import ClipSource, check_resumable, prepare_split

AVE_FILES = {"train": "trainSet.txt", "test": "testSet.txt", "val": "valSet.txt"}
AVE_HEADER = "category&videoid&quality&starttime&endtime"
AVE_FORM = ("a folder holding trainSet.txt and testSet.txt (AVE_Dataset), or "
            "train=FILE,test=FILE[,val=FILE][,annotations=FILE]")


def read_ave_list(path: Path) -> list[dict[str, Any]]:
    """Rows {category, video_id, quality, start, end, where} of an AVE annotation file."""
    path = Path(path)
    rows = []
    for line_no, line in enumerate(read_text(path, "AVE annotation file").splitlines(), start=1):
        line = line.strip()
        if not line or (line_no == 1 and line.replace(" ", "").lower() == AVE_HEADER):
            continue
        parts = line.split("&")
        if len(parts) != 5:
            raise StellaError(f"{path}:{line_no}: expected category&video_id&quality&start&end (AVE's annotation "
                              f"form), got {line!r}"[:300])
        category, video_id, quality, start, end = (p.strip() for p in parts)
        try:
            s, e = float(start), float(end)
        except ValueError:
            raise StellaError(f"{path}:{line_no}: start and end must be seconds, got {start!r}, {end!r}") from None
        if not 0 <= s <= e:
            raise StellaError(f"{path}:{line_no}: event [{start}, {end}) ends before it starts or is negative; fix "
                              f"the line or remove it")
        rows.append({"category": category, "video_id": video_id, "quality": quality, "start": s, "end": e,
                     "where": f"{path}:{line_no}"})
    return rows


def resolve_ave_files(spec: str | Path | None, root: Path) -> tuple[dict[str, Path], Path | None]:
    """--list as AVE's folder (default: --root) or train=FILE,test=FILE[,val=FILE][,annotations=FILE] ->
    ({split: file}, Annotations.txt or None). Annotations.txt is looked for beside the split files."""
    text = str(spec) if spec is not None else str(root)
    if "=" in text:
        files = parse_split_files(text, [*AVE_FILES, "annotations"], AVE_FORM)
        if "train" not in files or "test" not in files:
            raise StellaError(f"--list {text}: both train= and test= are required ({AVE_FORM})")
        annotations = files.pop("annotations", None) or files["train"].parent / "Annotations.txt"
        return files, annotations if annotations.is_file() or "annotations=" in text else None
    folder = Path(text)
    if not folder.is_dir():
        raise StellaError(f"--list {text}: not a folder; give {AVE_FORM}")
    files = {split: folder / name for split, name in AVE_FILES.items() if (folder / name).is_file()}
    gone = [AVE_FILES[s] for s in ("train", "test") if s not in files]
    if gone:
        raise StellaError(f"{folder}: no {' or '.join(gone)} here; give --list {AVE_FORM}")
    return files, folder / "Annotations.txt" if (folder / "Annotations.txt").is_file() else None


def prepare_ave(out: Path, *, root: Path, annotations: str | Path | None = None, workers: int = 2,
                frames_format: str = "raw", progress: bool = True, spec: CacheSpec | None = None,
                allow_leaks: bool = False) -> dict[str, Any]:
    """`stella prep ave`: categories from Annotations.txt and the split files, train/test from trainSet.txt /
    testSet.txt (`annotations`: the --list value, see resolve_ave_files); one task "ave"; clips keep their event
    window."""
    root = Path(root)
    if not root.is_dir():
        raise StellaError(f"--root {root}: folder of AVE videos not found")
    files, annotation_file = resolve_ave_files(annotations, root)
    lists = {split: read_ave_list(path) for split, path in files.items()}
    everything = read_ave_list(annotation_file) if annotation_file else []
    labelled: dict[str, dict[str, list[str]]] = {}  # video id -> category -> where
    for r in everything + [r for rows in lists.values() for r in rows]:
        labelled.setdefault(r["video_id"], {}).setdefault(r["category"], []).append(r["where"])
    categories = sorted({c for cats in labelled.values() for c in cats})
    multi = {v: cats for v, cats in labelled.items() if len(cats) > 1}
    used = {split: rows for split, rows in lists.items() if split != "val"}
    warnings = [f"{files['val']}: {len(lists['val'])} rows not used (the authors train on trainSet.txt and test on "
                f"testSet.txt)"] if "val" in lists else []
    kept: dict[str, list[dict[str, Any]]] = {}
    missing: dict[str, list[dict[str, str]]] = {}
    for split, rows in used.items():
        note = duplicate_note(split, [(r["video_id"], r["where"]) for r in rows if r["video_id"] not in multi])
        warnings += [note] if note else []
        kept[split], missing[split], seen = [], [], set()
        for r in rows:
            if r["video_id"] in seen:
                continue
            seen.add(r["video_id"])
            if r["video_id"] in multi:
                cats = multi[r["video_id"]]
                missing[split].append({"clip_id": r["video_id"], "source": r["where"], "reason": (
                    f"labelled with {len(cats)} categories ({'; '.join(cats)}): left out, its segments would carry "
                    f"two labels")})
            else:
                kept[split].append(r)
    left_out = sorted({m["clip_id"] for ms in missing.values() for m in ms})
    if left_out:
        warnings.append(f"{len(left_out)} videos are labelled with more than one category and left out: " + examples(
            f"{v} ({'; '.join(f'{c} at {w[0]}' for c, w in multi[v].items())})" for v in left_out))
    empty = [f"{r['video_id']} ({r['where']})" for rows in kept.values() for r in rows if r["start"] == r["end"]]
    if empty:
        warnings.append(f"{len(empty)} zero-length events (start = end): prepared as all-background clips, as the "
                        f"release's labels have them: {examples(empty)}")
    leaks = check_leaks({s: [(r["video_id"], f"{r['video_id']} ({r['where']})") for r in rows]
                         for s, rows in kept.items()}, allow_leaks, [("train", "test")])
    index = MediaIndex(root)
    clips = {}
    for split, rows in kept.items():
        clips[split] = []
        for r in rows:
            path = index.find([r["video_id"]])
            if path is None:
                missing[split].append({"clip_id": r["video_id"], "source": r["where"],
                                       "reason": "no media file under --root"})
                continue
            label = categories.index(r["category"])
            clips[split].append(ClipSource(r["video_id"], str(path), label, [label], r["category"], "ave",
                                           event_start=r["start"], event_end=r["end"]))
    index.require_some(sum(len(r) for r in kept.values()), sum(len(c) for c in clips.values()),
                       [r["video_id"] for r in kept["train"][:3]])
    classes = [{"index": i, "name": c, "category": c, "task": "ave"} for i, c in enumerate(categories)]
    return write_prepared(out, "ave", ["ave"], classes, clips, missing, spec or CacheSpec(), workers=workers,
                          frames_format=frames_format, progress=progress, warnings=warnings + leak_note(leaks),
                          leaks=leaks, sources={"root": str(root), "lists": {k: str(v) for k, v in files.items()},
                                                "annotations": str(annotation_file) if annotation_file else None,
                                                "allow_leaks": allow_leaks})


def write_prepared(out: Path, dataset: str, tasks: list[str], classes: list[dict[str, Any]],
                   clips: dict[str, list[ClipSource]], missing: dict[str, list[dict[str, str]]], spec: CacheSpec, *,
                   workers: int, frames_format: str, progress: bool, sources: dict[str, Any],
                   extra_meta: dict[str, Any] | None = None, warnings: list[str] | None = None,
                   leaks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode every split (prep.prepare_split), then meta.json and prep_report.json; returns prep's summary.
    A finished OUT made from other inputs is refused before anything is written."""
    t0 = time.perf_counter()
    out = Path(out)
    spec = replace(spec, frames_format=frames_format)
    check_resumable(out, clips, spec)
    make_dir(out)
    write_meta(out, {"dataset": dataset, "tasks": tasks, "splits": list(clips), "spec": spec_to_dict(spec),
                     "classes": classes, "sources": sources, **(extra_meta or {})})
    summary: dict[str, Any] = {"out": str(out), "splits": {}, "skipped": {}, "skipped_clips": {},
                               "report": str(out / "prep_report.json"), "warnings": warnings or []}
    report: dict[str, Any] = {"dataset": dataset, "warnings": warnings or [], "leaks": leaks or {}, "splits": {}}
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
    """Rows {name, category, split, where} of AVSBench's s4_meta_data.csv: a header naming `category` and `split`
    (any order, extra columns ignored); the name is the `name` column, else the first (AVSBench's loader reads
    column 0)."""
    path = Path(path)
    rows, _ = read_rows(path, "AVSBench S4 csv")
    head = [h.strip().lower() for h in (rows[0] if rows else [])]
    if "category" not in head or "split" not in head:
        raise StellaError(f"{path}:1: expected a header naming category and split (AVSBench's s4_meta_data.csv), "
                          f"got {rows[0] if rows else 'an empty file'}")
    col = {"name": head.index("name") if "name" in head else 0, "category": head.index("category"),
           "split": head.index("split")}
    out = []
    for line_no, r in enumerate(rows[1:], start=2):
        if not any(x.strip() for x in r):
            continue
        got = {k: r[i].strip() if i < len(r) else "" for k, i in col.items()}
        if not got["name"] or not got["category"] or got["split"] not in ("train", "val", "test"):
            raise StellaError(f"{path}:{line_no}: expected a name, a category and split train|val|test, got {r}")
        out.append({**got, "where": f"{path}:{line_no}"})
    return out


def video_frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of a video's decoded frames (media.decode_clip resizes and crops frames of this size)."""
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
    except (av.FFmpegError, OSError, StopIteration) as err:
        raise StellaError(f"{path}: cannot decode a video frame: {err}") from err
    return frame.width, frame.height


def decode_mask(path: Path, size: int, video_size: tuple[int, int]) -> np.ndarray:
    """uint8 (size, size) 0/1 mask from a png (PyAV's png decoder) drawn over a whole video frame of `video_size`
    (width, height) at any resolution: resized to the frame's Resize(size) shape and centre-cropped as the frames
    are (media.resize_geometry), thresholded at half intensity."""
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
    except (av.FFmpegError, OSError, StopIteration) as err:
        raise StellaError(f"{path}: cannot decode the mask png ({err}); replace or remove it") from err
    rw, rh, left, top = resize_geometry(*video_size, size)
    gray = frame.reformat(width=rw, height=rh, format="gray", interpolation="BILINEAR").to_ndarray()
    return (gray[top:top + size, left:left + size] >= 128).astype(np.uint8)


def check_mask(path: Path, masks: Path) -> None:
    """A mask png holds at most two grey levels (object / background); anything else (a video frame) is refused."""
    try:
        with av.open(str(path)) as container:
            gray = next(container.decode(video=0)).reformat(format="gray").to_ndarray()
    except (av.FFmpegError, OSError, StopIteration) as err:
        raise StellaError(f"{path}: cannot decode the mask png: {err}") from err
    levels = len(np.unique(gray))
    if levels > 2:
        hint = f"; use --masks {masks / 'gt_masks'}" if (masks / "gt_masks").is_dir() else ""
        raise StellaError(f"{path}: not a mask ({levels} grey levels, a mask has 2): --masks must be AVSBench's "
                          f"gt_masks folder, not a folder of video frames{hint}")


def find_processed(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """AVSBench's processed release under root: ({name: frames folder}, {name: wav}) from
    visual_frames/**/{name}/{name}_1.png and audio_wav/**/{name}.wav; empty where root lacks them."""
    frames, wavs = {}, {}
    if (root / "visual_frames").is_dir() and (root / "audio_wav").is_dir():
        for p in walk_files(root / "visual_frames"):
            if p.name == f"{p.parent.name}_1.png":
                frames.setdefault(p.parent.name, p.parent)
        wavs = {p.stem: p for p in walk_files(root / "audio_wav") if p.suffix.lower() == ".wav"}
    return frames, wavs


def prepare_avs(out: Path, *, root: Path, meta_csv: Path, masks: Path | None = None, workers: int = 2,
                frames_format: str = "raw", progress: bool = True, spec: CacheSpec | None = None,
                allow_leaks: bool = False) -> dict[str, Any]:
    """`stella prep avs`: the train and test clips of s4_meta_data.csv, as videos under `root` (by name) or as the
    processed release (find_processed), and their masks under `masks` (default ROOT/gt_masks; {name}_{k}.png, as
    AVSBench's gt_masks/{split}/{category}/{name}/: a train video needs k = 1, or {name}.png, a test video k = 1 ..
    clip seconds, 5); masks go to cache/{split}/masks.npy, uint8 (N, K, S, S) with K = 1 (train) or 5 (test),
    aligned with the cached frames."""
    root = Path(root)
    if not root.is_dir():
        raise StellaError(f"--root {root}: folder of AVSBench videos not found")
    if masks is None:
        if not (root / "gt_masks").is_dir():
            raise StellaError(f"stella prep avs: --masks is required (AVSBench's gt_masks folder); {root} has none")
        masks = root / "gt_masks"
    masks = Path(masks)
    if not masks.is_dir():
        raise StellaError(f"--masks {masks}: folder of AVSBench mask pngs not found")
    rows = read_s4_csv(meta_csv)
    categories = sorted({r["category"] for r in rows})
    val = [r for r in rows if r["split"] == "val"]
    warnings = [f"{meta_csv}: {len(val)} val rows not used (the authors train on train and test on test)"] * bool(val)
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "test")}
    warnings += [n for s, rs in by_split.items() if (n := duplicate_note(s, [(r["name"], r["where"]) for r in rs]))]
    leaks = check_leaks({s: [(r["name"], f"{r['name']} ({r['where']})") for r in rs] for s, rs in by_split.items()},
                        allow_leaks, [("train", "test")])
    pngs: dict[str, list[Path]] = {}
    for p in walk_files(masks):
        if p.suffix.lower() == ".png":
            pngs.setdefault(p.name, []).append(p)
    index, (frame_dirs, wavs) = MediaIndex(root), find_processed(root)
    spec = spec or CacheSpec(clip_seconds=5.0, num_frames=40)  # S4 clips are 5 s
    per_clip = {"train": 1, "test": max(int(spec.clip_seconds), 1)}  # S4: 1 train mask, 5 test masks per video
    clips, missing, mask_files = {}, {}, {}
    for split, split_rows in by_split.items():
        clips[split], missing[split], mask_files[split], seen = [], [], [], set()
        for r in split_rows:
            name = r["name"]
            if name in seen:
                continue
            seen.add(name)
            found = [pngs.get(f"{name}_{k}.png", []) for k in range(1, per_clip[split] + 1)]
            if split == "train" and not found[0]:
                found = [pngs.get(f"{name}.png", [])]
            twice = next((f for f in found if len(f) > 1), None)
            if twice:
                raise StellaError(f"--masks {masks}: two masks named {twice[0].name} ({twice[0]}, {twice[1]}); "
                                  f"give AVSBench's gt_masks folder")
            path = index.find([name])
            processed = path is None and name in frame_dirs and name in wavs
            lacking = [k + 1 for k, f in enumerate(found) if not f]
            reason = ("no media file under --root" if path is None and not processed else
                      f"no mask png {name}_{lacking[0]}.png under --masks" if lacking else None)
            if reason:
                missing[split].append({"clip_id": name, "source": r["where"], "reason": reason})
                continue
            label = categories.index(r["category"])
            source = frame_dirs[name] if processed else path
            clips[split].append(ClipSource(name, str(source), label, [label], r["category"], "avs",
                                           audio=str(wavs[name]) if processed else None))
            mask_files[split].append((Path(source), [f[0] for f in found]))
    index.require_some(sum(len(r) for r in by_split.values()), sum(len(c) for c in clips.values()),
                       [r["name"] for r in by_split["train"][:3]])
    for entries in mask_files.values():
        for _, files in entries:
            for png in files:
                check_mask(png, masks)
    classes = [{"index": i, "name": c, "category": c, "task": "avs"} for i, c in enumerate(categories)]
    summary = write_prepared(out, "avs", ["avs"], classes, clips, missing, spec, workers=workers,
                             frames_format=frames_format, progress=progress, warnings=warnings + leak_note(leaks),
                             leaks=leaks, sources={"root": str(root), "csv": str(meta_csv), "masks": str(masks),
                                                   "allow_leaks": allow_leaks})
    for split, entries in mask_files.items():
        arr = np.zeros((len(entries), per_clip[split], spec.frame_size, spec.frame_size), np.uint8)
        status = np.load(Path(out) / "cache" / split / "status.npy")
        for row, (source, files) in enumerate(entries):
            if status[row] != DONE:  # skipped by prep (no audio, unreadable): no frames to align with
                continue
            size = video_frame_size(source / f"{source.name}_1.png" if source.is_dir() else source)
            for k, png in enumerate(files):
                arr[row, k] = decode_mask(png, spec.frame_size, size)
        with replacing(Path(out) / "cache" / split / "masks.npy") as fh:
            np.save(fh, arr)
    return summary


# ----------------------------------------------------------------------------------------------------------
# MSR-VTT


MSRVTT_LISTS = [  # (train, test) file names in a --list folder; the first pair found is used
    ("train_list_miech.txt", "test_list_miech.txt"),  # the authors' (collaborative-experts' 1k-B split)
    ("MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"),  # CLIP4Clip's msrvtt_data (JSFusion's 1k-A split)
    ("train_list_jsfusion.txt", "val_list_jsfusion.txt"),  # collaborative-experts' 1k-A split
    ("train_list_full.txt", "test_list_full.txt"),  # the full split
    ("train_list.txt", "test_list.txt"),
    ("train.txt", "test.txt"),
]
MSRVTT_FORM = "train=FILE,test=FILE or a folder holding one of the pairs " + ", ".join(f"{a} + {b}"
                                                                                       for a, b in MSRVTT_LISTS)
VIDEO_ID_COLUMNS = ("video_id", "videoid", "vid")


def read_video_list(path: Path) -> list[tuple[str, str]]:
    """[(video id, file:line)] of a list: a csv whose header has `video_id` (`,`, `;` or tab separated), or one id
    per line."""
    path = Path(path)
    rows, delimiter = read_rows(path, "MSR-VTT list")
    head = [h.strip().lower() for h in (rows[0] if rows else [])]
    col = next((head.index(k) for k in VIDEO_ID_COLUMNS if k in head), None)
    out = []
    if col is not None:
        for line_no, row in enumerate(rows[1:], start=2):
            if not any(x.strip() for x in row):
                continue
            if len(row) <= col or not row[col].strip():
                raise StellaError(f"{path}:{line_no}: no video_id in column {col + 1}: {row}"[:300])
            out.append((row[col].strip(), f"{path}:{line_no}"))
        return out
    for line_no, row in enumerate(rows, start=1):
        cells = [x.strip() for x in row if x.strip()]
        if len(cells) > 1 or (cells and " " in cells[0]):
            raise StellaError(f"{path}:{line_no}: expected one video id a line, or a csv whose header names "
                              f"video_id, got {delimiter.join(row)!r}"[:300])
        if cells:
            out.append((cells[0], f"{path}:{line_no}"))
    return out


def prepare_msrvtt(out: Path, *, root: Path, lists: Path | str, workers: int = 2, frames_format: str = "raw",
                   progress: bool = True, spec: CacheSpec | None = None, allow_leaks: bool = False) -> dict[str, Any]:
    """`stella prep msrvtt`: `lists` is the folder holding the train and test lists under their usual names
    (MSRVTT_LISTS), or `train=FILE,test=FILE`. The test list becomes the `retrieval` split."""
    root = Path(root)
    if not root.is_dir():
        raise StellaError(f"--root {root}: folder of MSR-VTT videos not found")
    files, warnings = resolve_msrvtt_lists(lists)
    listed = {split: read_video_list(path) for split, path in files.items()}
    warnings += [n for s, ids in listed.items() if (n := duplicate_note(s, ids))]
    leaks = check_leaks({s: [(v, f"{v} ({w})") for v, w in ids] for s, ids in listed.items()}, allow_leaks,
                        [("train", "retrieval")])
    index = MediaIndex(root)
    clips, missing = {}, {}
    for split, ids in listed.items():
        clips[split], missing[split], seen = [], [], set()
        for vid, where in ids:
            if vid in seen:
                continue
            seen.add(vid)
            media = index.find([vid])
            if media is None:
                missing[split].append({"clip_id": vid, "source": where, "reason": "no media file under --root"})
                continue
            clips[split].append(ClipSource(vid, str(media), 0, [0], "msrvtt", "msrvtt"))
    index.require_some(sum(len(m) for m in missing.values()), sum(len(c) for c in clips.values()),
                       [v for v, _ in listed["train"][:3]])
    classes = [{"index": 0, "name": "msrvtt", "category": "msrvtt", "task": "msrvtt"}]
    return write_prepared(out, "msrvtt", ["msrvtt"], classes, clips, missing, spec or CacheSpec(), workers=workers,
                          frames_format=frames_format, progress=progress, warnings=warnings + leak_note(leaks),
                          leaks=leaks, sources={"root": str(root), "lists": {k: str(v) for k, v in files.items()},
                                                "allow_leaks": allow_leaks})


def resolve_msrvtt_lists(lists: Path | str) -> tuple[dict[str, Path], list[str]]:
    """({'train': file, 'retrieval': file}, notes) from a folder of lists or `train=FILE,test=FILE`."""
    text = str(lists)
    if "=" not in text:
        folder = Path(text)
        if not folder.is_dir():
            raise StellaError(f"--list {text}: not a folder; give {MSRVTT_FORM}")
        pairs = [(folder / a, folder / b) for a, b in MSRVTT_LISTS if (folder / a).is_file() and (folder / b).is_file()]
        if not pairs:
            raise StellaError(f"{folder}: no MSR-VTT train/test lists here; give --list {MSRVTT_FORM}")
        notes = [f"--list {folder}: used {pairs[0][0].name} + {pairs[0][1].name} (the first pair found; also "
                 f"here: {', '.join(f'{a.name} + {b.name}' for a, b in pairs[1:])})"] if len(pairs) > 1 else []
        return {"train": pairs[0][0], "retrieval": pairs[0][1]}, notes
    found = parse_split_files(text, ("train", "test"), MSRVTT_FORM)
    if set(found) != {"train", "test"}:
        raise StellaError(f"--list {text}: both train= and test= lists are required")
    return {"train": found["train"], "retrieval": found["test"]}, []
