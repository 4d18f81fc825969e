"""`stella prep ave`: the downstream dataset's annotation files -> the prepared-data layout of cache.py.

AVE (Tian et al. 2018): `Annotations.txt`, `trainSet.txt`, `testSet.txt` (and `valSet.txt`), one video a line,
'&'-separated: category & video id & quality & start second & end second (Annotations.txt opens with a header
line). A video's event is [start, end); its 10 one-second segments are labelled by the event's category or
background (ave.py). Videos are found by file stem under --root; a listed video with no file, no audio or an
unreadable file is skipped and reported (prep_report.json), as for `stella prep vggsound`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from stella_cli.cache import CacheSpec, disk_bytes, spec_to_dict, write_meta
from stella_cli.prep import ClipSource, MediaIndex, _Entry, prepare_split

AVE_FILES = {"train": "trainSet.txt", "test": "testSet.txt"}


def read_ave_list(path: Path) -> list[dict[str, Any]]:
    """Rows {category, video_id, quality, start, end, where} of an AVE annotation file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: AVE annotation file not found")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.lower().startswith("category&"):
            continue
        parts = line.split("&")
        if len(parts) != 5:
            raise ValueError(f"{path}:{line_no}: expected category&video_id&quality&start&end, got {line!r}")
        category, video_id, quality, start, end = (p.strip() for p in parts)
        try:
            s, e = float(start), float(end)
        except ValueError:
            raise ValueError(f"{path}:{line_no}: start and end must be seconds, got {start!r}, {end!r}") from None
        if not 0 <= s < e:
            raise ValueError(f"{path}:{line_no}: event [{start}, {end}) is empty or negative")
        rows.append({"category": category, "video_id": video_id, "quality": quality, "start": s, "end": e,
                     "where": f"{path}:{line_no}"})
    return rows


def prepare_ave(out: Path, *, root: Path, annotations: Path | None = None, workers: int = 2,
                frames_format: str = "raw", progress: bool = True, spec: CacheSpec | None = None) -> dict[str, Any]:
    """`stella prep ave`: categories from Annotations.txt (else the split files), train/test from trainSet.txt /
    testSet.txt under `annotations` (default: root); one task "ave"; clips keep their event window."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root}: folder of AVE videos not found")
    folder = Path(annotations or root)
    lists = {split: read_ave_list(folder / name) for split, name in AVE_FILES.items()}
    everything = read_ave_list(folder / "Annotations.txt") if (folder / "Annotations.txt").is_file() else []
    categories = sorted({r["category"] for r in everything} | {r["category"] for s in lists.values() for r in s})
    index = MediaIndex(root)
    clips, missing = {}, {}
    for split, rows in lists.items():
        clips[split], missing[split] = [], []
        for r in rows:
            path = index.find(_Entry(r["video_id"], [], [r["video_id"]], r["video_id"], r["where"]))
            if path is None:
                missing[split].append({"clip_id": r["video_id"], "source": r["where"], "reason": "no media file under --root"})
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
    from dataclasses import replace

    t0 = time.perf_counter()
    out = Path(out)
    spec = replace(spec, frames_format=frames_format)
    out.mkdir(parents=True, exist_ok=True)
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
    (out / "prep_report.json").write_text(json.dumps(report, indent=2))
    summary["seconds"] = time.perf_counter() - t0
    summary["bytes"] = disk_bytes(out)
    return summary
