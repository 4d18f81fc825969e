"""`stella prep vggsound|audioset`: clip lists -> continual task split -> decoded feature cache.

Task split (method.md §5.2, the authors' tools/{vggsound,audioset}/data_preprocess):
  VGGSound  8 tasks sports, music, vehicle, people, animals, home_nature (home + nature), others_part1 (tools + the
            8 OTHERS_PART1 classes), others_part2 (the other "others"). Classes keep the label csv's order; the
            first 20 of a task are trained (train + test, at most 400 train clips per class, in list order). The
            retrieval split keeps every class of the task (method.md §6.1), 5 clips per class.
  AudioSet  7 tasks human, vehicle, nature, animal, others, home, music; a clip's labels are cut to the classes
            of the category table, and a clip whose remaining labels fall in more than one task is excluded.
Subsets (`--subset`) for the initialisation chain (method.md §1.9, §2.5):
  tasks     the continual task split above (default).
  unused    VGGSound only: the clips the task split leaves out (train: every clip of the classes beyond the first
            20 of a task, and the clips over the 400-clip cap; test: the test clips of those classes), the
            authors' vgg_unused_cleaned_shrink8.csv (tools/vggsound/data_preprocess/split_vggsound.py).
  all       every clip of the lists: VGGSound's 'Origin' (every class trained, no cap) or, for AudioSet, every
            class of the label csv as one task "all" (AudioSet-20K; no category table needed).
Clip lists: CAV-MAE json (+ label csv), the authors' header-less STELLA csv, or a folder of raw clips (files read by
inputs.py: byte-order marks, linked folders). A clip listed twice in a split is kept once and reported; a clip in
both train and test (or retrieval) is refused unless allow_leaks. Each split is decoded by `prepare_split`
(media.decode_clip + audio.clip_fbank) into the cache.py layout; prep_report.json lists every clip left out and why.
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stella_cli import media
from stella_cli.audio import clip_fbank
from stella_cli.cache import (DONE, FAILED, SPLITS, CacheSpec, SplitWriter, disk_bytes, open_or_create, spec_to_dict,
                              write_manifest, write_meta)
from stella_cli.errors import StellaError
from stella_cli.inputs import (MEDIA_EXTENSIONS, MediaIndex, check_leaks, duplicate_note, leak_note, parse_split_files,
                               read_rows, read_text, walk_files)
from stella_cli.files import atomic_write_text, make_dir
from stella_cli.pool import run_jobs

VGGSOUND_TASKS = ["sports", "music", "vehicle", "people", "animals", "home_nature", "others_part1", "others_part2"]
VGGSOUND_CATEGORIES = {"sports", "music", "vehicle", "people", "animals", "home", "nature", "tools", "others"}
OTHERS_PART1 = ["fireworks banging", "slot machine", "machine gun shooting", "civil defense siren", "missile launch",
                "cap gun shooting", "printer printing", "lathe spinning"]  # method.md §5.2: joined with "tools"
AUDIOSET_TASKS = ["human", "vehicle", "nature", "animal", "others", "home", "music"]
CLASSES_PER_TASK = 20  # method.md §5.2 (VGGSound)
MAX_TRAIN_PER_CLASS = 400
RETRIEVAL_PER_CLASS = 5  # used when the retrieval list is derived from the test list
SUBSETS = ("tasks", "unused", "all")
KNOWN_LISTS = {  # file names of the CAV-MAE jsons and of the authors' csvs, looked up in a --list folder
    "vggsound": {"train": ["vgg_train_cleaned.json", "vgg_train_cleaned_shrink8.csv", "vgg_train_cleaned.csv"],
                 "test": ["vgg_test_cleaned.json", "vgg_test_cleaned_shrink8.csv", "vgg_test_cleaned.csv"],
                 "retrieval": ["vgg_test_5_per_class_for_retrieval_cleaned.json",
                               "vgg_test_5_per_class_for_retrieval_cleaned_shrink8.csv",
                               "vgg_test_5_per_class_for_retrieval_cleaned.csv"],
                 "labels": ["class_labels_indices_vgg.csv", "class_labels_indices.csv"], "categories": ["stat.csv"]},
    "audioset": {"train": ["audioset_2m_cleaned.json", "audioset_2m_cleaned.csv"],
                 "test": ["audioset_eval_cleaned.json", "audioset_2m_eval_cleaned.csv"],
                 "retrieval": ["audioset_eval_5_per_class_for_retrieval_cleaned.json",
                               "audioset_2m_eval_5_per_class_for_retrieval_cleaned.csv"],
                 "labels": ["class_labels_indices.csv"], "categories": ["class_labels_indices_audioset.csv"]},
    "audioset20k": {"train": ["audioset_20k_cleaned.json", "audioset_20k_cleaned.csv"],  # `stella prep audioset20k`
                    "test": ["audioset_eval_cleaned.json", "audioset_2m_eval_cleaned.csv"],
                    "retrieval": ["audioset_eval_5_per_class_for_retrieval_cleaned.json",
                                  "audioset_2m_eval_5_per_class_for_retrieval_cleaned.csv"],
                    "labels": ["class_labels_indices.csv"]},
}


@dataclass
class ClipSource:
    clip_id: str
    source: str  # path of the media file
    label: int  # index into meta.json classes
    labels: list[int]
    category: str
    task: str
    event_start: float | None = None  # seconds; the synthetic benchmark knows when its sound plays
    event_end: float | None = None
    audio: str | None = None  # a separate audio file: `source` is then a folder of frames (media.decode_frame_folder)
    frames_per_second: float = 1.0  # of such a frame folder (AVSBench's visual_frames: 1 fps)


@dataclass
class ClassInfo:
    name: str
    mid: str
    category: str
    task: str
    trained: bool  # among the classes trained on (VGGSound: the first 20 of its task)
    index: int = -1


@dataclass
class ListEntry:
    """One row of a clip list, before its classes and media file are resolved."""

    clip_id: str
    refs: list[str]  # mids, or class names
    names: list[str]  # file stems the media file may have
    ytid: str  # YouTube id, for files named {ytid}_{start}_{end}
    where: str  # file:line, for messages
    path: str | None = None  # explicit media path


@dataclass
class Plan:
    """What prepare_real will decode: the classes and, per split, the clips and what was left out."""

    dataset: str
    tasks: list[str]
    classes: list[ClassInfo]
    clips: dict[str, list[ClipSource]]
    missing: dict[str, list[dict[str, str]]]
    excluded: dict[str, Counter]
    warnings: list[str] = field(default_factory=list)
    sources: dict[str, Any] = field(default_factory=dict)
    leaks: dict[str, Any] = field(default_factory=dict)  # {'train/test': {'count', 'examples'}} (--allow-leaks)


def canon(name: str) -> str:
    """Class-name key: CAV-MAE writes "a, b" as "a_ b", folders write "a_b"; all compare equal here."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", name.lower()).split())


# ----------------------------------------------------------------------------------------------------------
# input files


def read_class_csv(path: Path) -> list[dict[str, Any]]:
    """Rows {name, mid, category, line} of a label csv (header index,mid,display_name[,category], or CAV-MAE's rows
    index,mid,display_name without the header), a table with a header naming display_name/name and category, or
    VGGSound's header-less stat.csv (name, count, category)."""
    path = Path(path)
    rows, _ = read_rows(path, "class table", delimiter=",")
    if not any(rows):
        raise StellaError(f"{path}: empty class table")
    head = [h.strip().lower() for h in rows[0]]
    out = []
    if "category" in head or "display_name" in head or "mid" in head:
        name_col = next((head.index(k) for k in ("display_name", "name", "label") if k in head), None)
        if name_col is None:
            raise StellaError(f"{path}:1: header has no display_name column: {rows[0]}")
        mid_col = head.index("mid") if "mid" in head else None
        cat_col = head.index("category") if "category" in head else None
        for line, r in enumerate(rows[1:], start=2):
            if not r:
                continue
            if len(r) != len(head):
                raise StellaError(f"{path}:{line}: expected {len(head)} columns ({','.join(head)}), got {len(r)}")
            out.append({"name": r[name_col].strip(), "mid": r[mid_col].strip() if mid_col is not None else None,
                        "category": r[cat_col].strip() if cat_col is not None else None, "line": line})
        return out
    if _is_label_row(rows[0]):  # CAV-MAE's label csv saved without its header line
        for line, r in enumerate(rows, start=1):
            if r and not _is_label_row(r):
                raise StellaError(f"{path}:{line}: expected 'index,mid,display_name' as on line 1, got {r}")
        return [{"name": r[2].strip(), "mid": r[1].strip(), "category": None, "line": line}
                for line, r in enumerate(rows, start=1) if r]
    for line, r in enumerate(rows, start=1):  # stat.csv: name, number of clips, category
        if not r:
            continue
        if len(r) != 3 or not r[1].strip().isdigit():
            raise StellaError(f"{path}:{line}: expected a label csv (index,mid,display_name), VGGSound's stat.csv "
                              f"(class name,number of clips,category) or a table with a header row, got {r}")
        out.append({"name": r[0].strip(), "mid": None, "category": r[2].strip(), "line": line})
    return out


def _is_label_row(row: list[str]) -> bool:
    """index,mid,display_name as in CAV-MAE's class_labels_indices*.csv ('0,/m/09x0r,Speech')."""
    return len(row) == 3 and row[0].strip().isdigit() and bool(re.fullmatch(r"/[a-z]/\S+", row[1].strip()))


def read_category_table(path: Path, dataset: str) -> dict[str, tuple[str, str]]:
    """canon(class name) -> (class name, category). A .py file is read as the authors' AudioSet class lists
    (tools/audioset/__init__.py: category_info, category_2_simple), whose group names are classes too."""
    path = Path(path)
    allowed = _allowed_categories(dataset)
    if path.suffix == ".py":
        rows = _read_authors_class_lists(path)
    else:
        rows = [(r["name"], r["category"], r["line"]) for r in read_class_csv(path)]
    table: dict[str, tuple[str, str]] = {}
    for name, category, line in rows:
        if category is None:
            raise StellaError(f"{path}: no category column (expected VGGSound's stat.csv or a table with a header "
                              f"display_name,category)")
        if category not in allowed:
            raise StellaError(f"{path}:{line}: unknown category {category!r} for class {name!r}; "
                              f"{dataset} categories are {sorted(allowed)}")
        old = table.setdefault(canon(name), (name, category))
        if old[1] != category:
            raise StellaError(f"{path}:{line}: class {name!r} is in both {old[1]!r} and {category!r}")
    return table


def _allowed_categories(dataset: str) -> set[str]:
    """VGGSound: stat.csv's 9 categories, or the task names the authors' shrink8 label csv holds; AudioSet: tasks."""
    return VGGSOUND_CATEGORIES | set(VGGSOUND_TASKS) if dataset == "vggsound" else set(AUDIOSET_TASKS)


def _read_authors_class_lists(path: Path) -> list[tuple[str, str, int]]:
    try:
        tree = ast.parse(read_text(path, "class-list file"), filename=str(path))
    except SyntaxError as err:
        raise StellaError(f"{path}:{err.lineno}: not a Python class-list file: {err.msg}") from err
    found: dict[str, tuple[Any, int]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = (ast.literal_eval(node.value), node.lineno)
            except ValueError:
                continue
    if "category_info" not in found or "category_2_simple" not in found:
        raise StellaError(f"{path}: expected the dicts category_info and category_2_simple "
                          "(the authors' tools/audioset/__init__.py)")
    (groups, line), (simple, _) = found["category_info"], found["category_2_simple"]
    rows = []
    for group, names in groups.items():
        if group not in simple:
            raise StellaError(f"{path}:{line}: group {group!r} has no entry in category_2_simple")
        for name in list(names) + group.split("&"):  # the group names are classes too (the authors' tools)
            rows.append((name, simple[group], line))
    return rows


def read_cavmae_json(path: Path) -> list[ListEntry]:
    """CAV-MAE json {"data": [{"video_id", "wav", "video_path", "labels": "mid1,mid2"}]}."""
    try:
        data = json.loads(read_text(path, "clip list"))
    except json.JSONDecodeError as err:
        raise StellaError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise StellaError(f'{path}: expected {{"data": [...]}} (a CAV-MAE json)')
    out = []
    for i, item in enumerate(data["data"]):
        where = f"{path}: data[{i}]"
        if not isinstance(item, dict) or "video_id" not in item or "labels" not in item:
            raise StellaError(f"{where}: expected an object with video_id and labels, got {item!r}"[:300])
        vid, labels = str(item["video_id"]), item["labels"]
        refs = labels.split(",") if isinstance(labels, str) else [str(x) for x in labels]
        names, path_hint = [vid], None
        vp = str(item.get("video_path") or "")
        if Path(vp).suffix.lower() in MEDIA_EXTENSIONS:
            path_hint = vp
            names.append(Path(vp).stem)
        m = re.fullmatch(r"(.+)_(\d+)", vid)  # VGGSound ids are {ytid}_{start s}; audiosetdl files {ytid}_{ms}_{ms}
        if m:
            start = int(m.group(2))
            names.append(f"{m.group(1)}_{start * 1000}_{(start + 10) * 1000}")
        out.append(ListEntry(vid, [r.strip() for r in refs if r.strip()], names, m.group(1) if m else vid, where,
                          path_hint))
    return out


def read_stella_csv(path: Path) -> list[ListEntry]:
    """The authors' header-less csv: idx, vid, frames_dir, wav, label mid(s) (comma-joined), category (method.md §7.1).
    The category column is not used: categories come from the category table. The frames folder is named
    {ytid}_{start ms}_{end ms} (audiosetdl's file name); VGGSound's own {ytid}_{start s:06d} is looked for too."""
    out = []
    rows, _ = read_rows(path, "clip list", delimiter=",")
    for line, r in enumerate(rows, start=1):
        if not r:
            continue
        if len(r) != 6:
            raise StellaError(f"{path}:{line}: expected 6 columns (idx, vid, frames_dir, wav, label, category) "
                              f"as the authors' csv lists, got {len(r)}: {r}"[:300])
        _, vid, frames_dir, wav, label, _ = (x.strip() for x in r)
        stem = Path(frames_dir).name or Path(wav).stem or vid
        names = [stem, Path(wav).stem, vid]
        m = re.fullmatch(r"(.+)_(\d+)_(\d+)", stem)
        if m and int(m.group(2)) % 1000 == 0:  # the VGGSound release names a clip by its start second, 6 digits
            names += [f"{m.group(1)}_{int(m.group(2)) // 1000:06d}", f"{m.group(1)}_{int(m.group(2)) // 1000}"]
        refs = [x.strip() for x in label.split(",") if x.strip()]
        out.append(ListEntry(stem, refs, names, vid, f"{path}:{line}"))
    return out


def read_clip_list(path: Path) -> list[ListEntry]:
    path = Path(path)
    if not path.is_file():
        raise StellaError(f"{path}: clip list not found")
    if path.suffix.lower() == ".json":
        return read_cavmae_json(path)
    return read_stella_csv(path)


def scan_folder(root: Path) -> dict[str, list[ListEntry]]:
    """ROOT/{train,test,retrieval}/CLASS/*.mp4 (any depth below the split; class = parent folder; linked folders
    are followed); without split folders, every clip of ROOT/**/CLASS/* is a training clip."""
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    out: dict[str, list[ListEntry]] = {s: [] for s in SPLITS}
    for split, base in (split_dirs or {"train": root}).items():
        for p in walk_files(base):
            if p.suffix.lower() in MEDIA_EXTENSIONS and p.parent != base:
                out[split].append(ListEntry(p.stem, [p.parent.name], [p.stem], p.stem, str(p), str(p)))
    return out


def resolve_lists(list_file: Any, dataset: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """--list as SPLIT=FILE (repeatable or comma-joined), a mapping, or a folder holding the CAV-MAE jsons / the
    authors' csvs under their usual names. Returns ({split: list}, {"labels"/"categories": file found there})."""
    form = f"SPLIT=FILE,... (splits {list(SPLITS)}) or a folder of lists"
    if isinstance(list_file, Mapping):
        lists = {s: Path(f) for s, f in list_file.items()}
        unknown = sorted(set(lists) - set(SPLITS))
        if unknown:
            raise StellaError(f"--list: unknown split {unknown[0]!r}; choose from {list(SPLITS)}")
    else:
        raw = [list_file] if isinstance(list_file, (str, Path)) else list(list_file)
        if len(raw) == 1 and Path(str(raw[0])).is_dir():
            folder, found, extra = Path(str(raw[0])), {}, {}
            for key, names in KNOWN_LISTS[dataset].items():
                hit = next((folder / n for n in names if (folder / n).is_file()), None)
                if hit is not None:
                    (found if key in SPLITS else extra)[key] = hit
            if "train" not in found or "test" not in found:
                raise StellaError(f"{folder}: no {dataset} train/test lists here (looked for "
                                  f"{KNOWN_LISTS[dataset]['train'] + KNOWN_LISTS[dataset]['test']})")
            return found, extra
        if len(raw) == 1 and "=" not in str(raw[0]) and not Path(str(raw[0])).exists():
            raise StellaError(f"--list {raw[0]}: no such file or folder; give {form}")
        lists = {}
        for item in raw:
            lists.update(parse_split_files(str(item), SPLITS, form))
    if "train" not in lists or "test" not in lists:
        raise StellaError(f"--list: train and test lists are required (retrieval is optional), got {sorted(lists)}")
    return lists, {}


# ----------------------------------------------------------------------------------------------------------
# classes and the task split


def build_classes(dataset: str, table: dict[str, tuple[str, str]], label_rows: list[dict] | None,
                  classes_per_task: int, warnings: list[str], label_file: Path | None = None) -> list[ClassInfo]:
    """Classes in the label csv's order (else the table's, sorted by name for VGGSound), with their task; indices
    put the trained classes first, task by task (method.md §5.2)."""
    if label_rows is not None:
        rows = [(r["name"], r["mid"], r.get("category"), r["line"]) for r in label_rows]
    else:
        names = [n for n, _ in table.values()]
        rows = [(n, n, None, 0) for n in (sorted(names) if dataset == "vggsound" else names)]
    classes, seen = [], set()
    for name, mid, own_category, line in rows:
        key = canon(name)
        category = table[key][1] if key in table else own_category
        if category and category not in _allowed_categories(dataset):
            raise StellaError(f"{label_file}:{line}: unknown category {category!r} for class {name!r}; "
                              f"{dataset} categories are {sorted(_allowed_categories(dataset))}")
        if not category:
            if dataset == "vggsound":
                raise StellaError(f"{label_file}:{line}: class {name!r} has no category in the category table")
            continue  # AudioSet: a class outside the 7 category lists is not used
        seen.add(key)
        name = table[key][0] if key in table else name  # the table's spelling ("a, b", not CAV-MAE's "a_ b")
        classes.append(ClassInfo(name, mid or name, category, _task_of(dataset, name, category), True))
    if dataset == "audioset":
        unused = sorted(n for k, (n, _) in table.items() if k not in seen)
        if unused:
            warnings.append(f"{len(unused)} classes of the category table are not in the label csv: {unused}")
    tasks = VGGSOUND_TASKS if dataset == "vggsound" else AUDIOSET_TASKS
    if dataset == "vggsound":
        for task in tasks:
            for k, c in enumerate(c for c in classes if c.task == task):
                c.trained = k < classes_per_task  # method.md §5.2: the first 20 classes of each task
    ordered = [c for t in tasks for c in classes if c.task == t and c.trained]
    ordered += [c for t in tasks for c in classes if c.task == t and not c.trained]
    for i, c in enumerate(ordered):
        c.index = i
    return ordered


def _task_of(dataset: str, name: str, category: str) -> str:
    if dataset == "audioset":
        return category
    if category in ("home", "nature"):
        return "home_nature"
    if category == "tools" or (category == "others" and canon(name) in {canon(n) for n in OTHERS_PART1}):
        return "others_part1"
    return "others_part2" if category == "others" else category


def assign_split(split: str, entries: list[ListEntry], classes: list[ClassInfo], media_index: MediaIndex, *,
                 known_refs: set[str], max_per_class: int | None, retrieval_all_classes: bool,
                 label_file: Path | None, unused: bool = False
                 ) -> tuple[list[ClipSource], list[dict[str, str]], Counter]:
    """Resolve each entry's classes, apply the task rules, find its media file; keep list order (method.md §5.2).

    known_refs: every mid of the label csv (AudioSet classes outside the category table are known but unused).
    unused: keep exactly the clips the task split drops for their class or the cap (`--subset unused`).
    Returns the clips, the entries without a media file, and counts of entries excluded by the rules.
    """
    by_ref = {c.mid: c for c in classes} | {canon(c.name): c for c in classes}
    known = set(by_ref) | known_refs
    clips, missing, excluded, per_class, seen = [], [], Counter(), Counter(), set()
    for e in entries:
        for r in e.refs:
            if r not in known and canon(r) not in known:
                where = label_file or "the category table (a list of mids needs --labels)"
                raise StellaError(f"{e.where}: unknown class {r!r} (not in {where})")
        hits = [by_ref.get(r) or by_ref.get(canon(r)) for r in e.refs]
        hits = list({c.index: c for c in hits if c is not None}.values())  # distinct, in label order
        if not hits:
            excluded["no label in the category table"] += 1
            continue
        if len({c.task for c in hits}) > 1:
            excluded["labels in more than one category"] += 1  # method.md §5.2 (AudioSet)
            continue
        primary = hits[0]
        # faithful: the retrieval split keeps every class of a task, also those not trained (method.md §6.1)
        if not primary.trained and not (split == "retrieval" and retrieval_all_classes) and not unused:
            excluded["class not trained (beyond the first classes of its task)"] += 1
            continue
        if e.clip_id in seen:
            excluded["duplicate clip id"] += 1
            continue
        seen.add(e.clip_id)
        path = media_index.find(e.names, e.ytid, e.path)
        if path is None:
            missing.append({"clip_id": e.clip_id, "source": e.where, "reason": "no media file under --root"})
            continue
        over_cap = max_per_class is not None and per_class[primary.index] >= max_per_class
        per_class[primary.index] += 1
        if unused and primary.trained and not over_cap:
            excluded["used by the continual tasks"] += 1
            continue
        if over_cap and not unused:
            excluded[f"over the {max_per_class}-clip cap of its class"] += 1
            continue
        clips.append(ClipSource(e.clip_id, str(path), primary.index, [c.index for c in hits], primary.category,
                                primary.task))
    return clips, missing, excluded


def plan_real(dataset: str, *, list_file: Any = None, root: Path | None = None, categories: Path | None = None,
              labels: Path | None = None, classes_per_task: int = CLASSES_PER_TASK,
              max_train_per_class: int = MAX_TRAIN_PER_CLASS, retrieval_per_class: int = RETRIEVAL_PER_CLASS,
              retrieval_all_classes: bool = True, subset: str = "tasks", allow_leaks: bool = False) -> Plan:
    """Read the inputs and build the task split (or another `subset`, see the module docstring), without decoding
    anything. A clip listed twice in a split is kept once and reported; a clip in both train and test (or
    retrieval) is refused unless `allow_leaks`."""
    if dataset not in ("vggsound", "audioset"):
        raise StellaError(f"unknown dataset {dataset!r}; choose vggsound or audioset")
    if subset not in SUBSETS or (subset == "unused" and dataset != "vggsound"):
        choices = SUBSETS if dataset == "vggsound" else ("tasks", "all")
        raise StellaError(f"--subset {subset}: {dataset} subsets are {', '.join(choices)}")
    if root is None or not Path(root).is_dir():
        raise StellaError(f"--root {root}: folder of media files not found")
    root = Path(root)
    lists, found = resolve_lists(list_file, dataset) if list_file is not None else ({}, {})
    labels = labels or found.get("labels")
    categories = categories or found.get("categories")
    label_rows = read_class_csv(labels) if labels else None
    if label_rows is not None:
        for r in label_rows:
            if not r["mid"]:
                raise StellaError(f"{labels}:{r['line']}: --labels needs a label csv with a mid per class "
                                  f"(index,mid,display_name); a name,count,category table such as VGGSound's "
                                  f"stat.csv goes to --categories")
    warnings: list[str] = []
    every_class = dataset == "audioset" and subset == "all"  # AudioSet-20K: all 527 classes, no category rules
    if every_class:
        if label_rows is None:
            raise StellaError("stella prep audioset --subset all: --labels is required (the CAV-MAE label "
                              "csv, class_labels_indices.csv)")
        classes = [ClassInfo(r["name"], r["mid"], "all", "all", True, i) for i, r in enumerate(label_rows)]
    else:
        if categories is None:
            if not (label_rows and all(r["category"] for r in label_rows)):
                raise StellaError(f"stella prep {dataset}: --categories is required (" + (
                    "VGGSound's stat.csv: name,count,category" if dataset == "vggsound" else
                    "the authors' tools/audioset/__init__.py, or a csv with header display_name,category") + ")")
            table = {}
        else:
            table = read_category_table(categories, dataset)
        per_task = 10**9 if subset == "all" else classes_per_task  # 'Origin': every class is trained
        classes = build_classes(dataset, table, label_rows, per_task, warnings, labels)
    known_refs = {r["mid"] for r in label_rows} if label_rows else set()
    entries = {s: read_clip_list(p) for s, p in lists.items()} if lists else scan_folder(root)
    warnings += [n for s, e in entries.items() if (n := duplicate_note(s, [(x.clip_id, x.where) for x in e]))]
    index = MediaIndex(root)
    derive = not entries.get("retrieval") or subset == "unused"
    if subset == "unused" and entries.get("retrieval"):
        warnings.append("--subset unused: the retrieval list is not used (its clips are the continual tasks' "
                        f"gallery); the first {retrieval_per_class} unused test clips per class are")
    elif derive:  # CAV-MAE's retrieval list is 5 test clips per class: derive it the same way
        warnings.append(f"no retrieval list: the first {retrieval_per_class} test clips per class are used")
    if derive:
        entries["retrieval"] = entries.get("test", [])
    if not entries.get("test"):
        warnings.append("no test clips: the test and retrieval splits are empty")
    clips, missing, excluded = {}, {}, {}
    for split in SPLITS if subset != "unused" else ("train", "test"):
        cap = {"train": max_train_per_class if dataset == "vggsound" and subset != "all" else None, "test": None,
               "retrieval": retrieval_per_class if derive else None}[split]
        clips[split], missing[split], excluded[split] = assign_split(
            split, entries.get(split, []), classes, index, known_refs=known_refs, max_per_class=cap,
            retrieval_all_classes=retrieval_all_classes, label_file=labels, unused=subset == "unused")
    if subset == "unused":  # the gallery: the first clips per class of the unused test clips
        seen: Counter = Counter()
        clips["retrieval"], missing["retrieval"], excluded["retrieval"] = [], [], Counter()
        for c in clips["test"]:
            seen[c.label] += 1
            if seen[c.label] <= retrieval_per_class:
                clips["retrieval"].append(c)
            else:
                excluded["retrieval"][f"beyond the first {retrieval_per_class} test clips of its class"] += 1
    found = sum(len(c) for c in clips.values()) + sum(n for x in excluded.values() for k, n in x.items()
                                                      if k.startswith(("used by", "over the")))
    index.require_some(sum(len(m) for m in missing.values()), found,
                       [n for e in entries.get("train", [])[:3] for n in e.names[:1]])
    leaks = check_leaks({s: [(os.path.realpath(c.source), c.clip_id) for c in clips[s]] for s in clips}, allow_leaks,
                        [("train", "test"), ("train", "retrieval")])
    warnings += leak_note(leaks)
    sources = {"lists": {s: str(p) for s, p in lists.items()} or f"folder {root}", "root": str(root),
               "categories": str(categories) if categories else None, "labels": str(labels) if labels else None,
               "classes_per_task": classes_per_task, "max_train_per_class": max_train_per_class,
               "retrieval_per_class": retrieval_per_class if derive else None,
               "retrieval_all_classes": retrieval_all_classes, "subset": subset, "allow_leaks": allow_leaks}
    tasks = ["all"] if every_class else VGGSOUND_TASKS if dataset == "vggsound" else AUDIOSET_TASKS
    return Plan(dataset, tasks, classes, clips, missing, excluded, warnings, sources, leaks)


# ----------------------------------------------------------------------------------------------------------
# decoding into the cache


def prepare_real(dataset: str, *, out: Path, list_file: Any = None, root: Path | None = None,
                 categories: Path | None = None, labels: Path | None = None, workers: int = 2,
                 frames_format: str = "raw", progress: bool = True, spec: CacheSpec | None = None,
                 classes_per_task: int = CLASSES_PER_TASK, max_train_per_class: int = MAX_TRAIN_PER_CLASS,
                 retrieval_per_class: int = RETRIEVAL_PER_CLASS, retrieval_all_classes: bool = True,
                 subset: str = "tasks", allow_leaks: bool = False) -> dict[str, Any]:
    """`stella prep vggsound|audioset`: plan the split, decode every split, write meta.json, the manifests and
    prep_report.json. Returns {'out', 'splits': {split: {task: n}}, 'skipped': {split: n}, 'seconds', 'bytes'}."""
    t0 = time.perf_counter()
    plan = plan_real(dataset, list_file=list_file, root=root, categories=categories, labels=labels,
                     classes_per_task=classes_per_task, max_train_per_class=max_train_per_class,
                     retrieval_per_class=retrieval_per_class, retrieval_all_classes=retrieval_all_classes,
                     subset=subset, allow_leaks=allow_leaks)
    return write_plan(plan, Path(out), replace(spec or CacheSpec(), frames_format=frames_format), workers=workers,
                      progress=progress, t0=t0)


def write_plan(plan: Plan, out: Path, spec: CacheSpec, *, workers: int, progress: bool,
               t0: float | None = None) -> dict[str, Any]:
    """Decode a plan's splits into OUT (resumable) with meta.json, the manifests and prep_report.json."""
    t0 = time.perf_counter() if t0 is None else t0
    dataset = plan.dataset
    check_resumable(out, plan.clips, spec)  # refuse a cache made from other lists or settings before touching it
    make_dir(out)
    write_meta(out, {"dataset": dataset, "tasks": plan.tasks, "splits": list(SPLITS), "spec": spec_to_dict(spec),
                     "classes": [{"index": c.index, "name": c.name, "mid": c.mid, "category": c.category,
                                  "task": c.task, "trained": c.trained} for c in plan.classes],
                     "sources": plan.sources})
    report: dict[str, Any] = {"dataset": dataset, "warnings": plan.warnings, "leaks": plan.leaks, "splits": {}}
    summary: dict[str, Any] = {"out": str(out), "splits": {}, "skipped": {}, "skipped_clips": {},
                               "report": str(out / "prep_report.json"), "warnings": plan.warnings}
    for split in SPLITS:
        res = prepare_split(out, split, plan.clips[split], spec, workers=workers, progress=progress)
        skipped = plan.missing[split] + res["skipped"]
        counts = {t: res["clips"].get(t, 0) for t in plan.tasks}
        summary["splits"][split] = counts
        summary["skipped"][split] = len(skipped)
        summary["skipped_clips"][split] = skipped
        report["splits"][split] = {"selected": len(plan.clips[split]) + len(plan.missing[split]),
                                   "prepared": sum(counts.values()), "clips": counts, "skipped": skipped,
                                   "excluded": dict(plan.excluded[split])}
    atomic_write_text(out / "prep_report.json", json.dumps(report, indent=2))
    summary["seconds"] = time.perf_counter() - t0
    summary["bytes"] = disk_bytes(out)
    return summary


def prepare_split(out: Path, split: str, clips: list[ClipSource], spec: CacheSpec, *, workers: int,
                  progress: bool) -> dict[str, Any]:
    """Decode the pending rows of one split into the cache (resumable), then write {split}.csv of the DONE rows.

    Returns {"clips": {task: n_done}, "skipped": [{"clip_id", "source", "reason"}], "decoded": rows tried now}.
    """
    out = Path(out)
    _check_rows(out, split, clips, spec)
    writer = SplitWriter(out, split, len(clips), spec)
    durations = open_or_create(out / "cache" / split / "duration.npy", np.float32, (len(clips),), writer.status)
    pending = writer.pending_rows()
    skipped = []
    bar = tqdm(total=len(pending), desc=f"prep {split}", unit="clip", disable=not progress, leave=False)
    last_flush = time.monotonic()
    try:
        for row, duration, reason in _decode_rows(out, split, clips, spec, pending, workers):
            if reason is None:
                durations[row] = duration
                writer.mark(row, DONE)
            else:
                writer.mark(row, FAILED)
                skipped.append({"row": row, "clip_id": clips[row].clip_id, "source": clips[row].source,
                                "reason": reason})
            bar.update(1)
            if time.monotonic() - last_flush > 2.0:
                durations.flush()
                writer.flush()
                last_flush = time.monotonic()
    finally:
        durations.flush()
        writer.flush()
        bar.close()
    done = [int(r) for r in np.flatnonzero(np.asarray(writer.status) == DONE)]
    write_manifest(out, split, [{"clip_id": clips[r].clip_id, "row": r, "label": clips[r].label,
                                 "labels": ";".join(map(str, clips[r].labels)), "category": clips[r].category,
                                 "task": clips[r].task, "duration": f"{float(durations[r]):.3f}",
                                 "source": clips[r].source, "event_start": _seconds(clips[r].event_start),
                                 "event_end": _seconds(clips[r].event_end)} for r in done])
    skipped = [{k: v for k, v in item.items() if k != "row"} for item in sorted(skipped, key=lambda x: x["row"])]
    return {"clips": dict(Counter(clips[r].task for r in done)), "skipped": skipped, "decoded": len(pending)}


def _seconds(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def check_resumable(out: Path, clips: Mapping[str, list[ClipSource]], spec: CacheSpec) -> None:
    """Refuse, before anything is written, an OUT whose cache holds other rows or settings than this run's."""
    for split, items in clips.items():
        path = Path(out) / "cache" / split / "rows.json"
        if path.is_file() and json.loads(path.read_text()) != _rows_record(items, spec):
            raise StellaError(f"{path}: the cache was prepared from another clip list or other settings; "
                              "use a new --out folder (nothing was changed)")


def _rows_record(clips: list[ClipSource], spec: CacheSpec) -> dict[str, Any]:
    return {"spec": spec_to_dict(spec), "clip_ids": [c.clip_id for c in clips], "sources": [c.source for c in clips]}


def _check_rows(out: Path, split: str, clips: list[ClipSource], spec: CacheSpec) -> None:
    """A re-run must see the same rows and settings as the cache it resumes."""
    check_resumable(out, {split: clips}, spec)
    path = out / "cache" / split / "rows.json"
    if not path.is_file():
        make_dir(path.parent)
        atomic_write_text(path, json.dumps(_rows_record(clips, spec)))


_WORKER: dict[str, Any] = {}


def _init_worker(out: str, split: str, n: int, spec: CacheSpec, threads: int) -> None:
    _WORKER.update(writer=SplitWriter(Path(out), split, n, spec), spec=spec, threads=threads)


def _prepare_row(job: tuple[int, str, str | None, float]) -> tuple[int, float, str | None]:
    """Decode one clip, compute its fbank and write its row (in a worker); (row, duration, reason or None)."""
    row, source, audio, frames_per_second = job
    spec = _WORKER["spec"]
    try:
        if audio is None:
            clip = media.decode_clip(source, fps=spec.fps, num_frames=spec.num_frames, frame_size=spec.frame_size,
                                     clip_seconds=spec.clip_seconds, sample_rate=spec.sample_rate,
                                     threads=_WORKER["threads"])
        else:
            clip = media.decode_frame_folder(source, audio, frames_per_second=frames_per_second,
                                             num_frames=spec.num_frames, frame_size=spec.frame_size,
                                             clip_seconds=spec.clip_seconds, sample_rate=spec.sample_rate)
    except media.ClipError as err:
        return row, 0.0, err.reason
    fbank = clip_fbank(clip.waveform, spec.sample_rate, spec.target_length, spec.num_mel_bins)  # (T, M)
    _WORKER["writer"].write(row, clip.frames, np.asarray(fbank))
    return row, clip.duration, None


def _decode_rows(out: Path, split: str, clips: list[ClipSource], spec: CacheSpec, pending: list[int],
                 workers: int):
    jobs = [(r, clips[r].source, clips[r].audio, clips[r].frames_per_second) for r in pending]
    if not jobs:
        return
    threads = 0 if workers <= 1 else max(1, (os.cpu_count() or 1) // workers)  # PyAV decode threads per clip
    try:
        yield from run_jobs(_prepare_row, jobs, workers, initializer=_init_worker,
                            initargs=(str(out), split, len(clips), spec, threads))
    finally:
        _WORKER.clear()


__all__ = ["ClipSource", "ClassInfo", "Plan", "prepare_real", "prepare_split", "plan_real", "write_plan", "SUBSETS",
           "read_class_csv", "read_category_table", "read_cavmae_json", "read_stella_csv", "canon", "check_resumable",
           "ListEntry", "SPLITS", "VGGSOUND_TASKS", "AUDIOSET_TASKS", "OTHERS_PART1"]
