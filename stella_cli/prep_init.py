"""`stella prep audioset20k`: the data of the initialisation chain's step 2 in one folder.

The authors pre-train the VGGSound stream's starting point on AudioSet-20K together with the VGGSound clips the
continual tasks leave out (method.md §1.9; data/video_datasets/audioset20k.py concatenates
audioset_20k_cleaned.csv and vgg_unused_cleaned_shrink8.csv), and train the AVM on the same data (§2.5). Here the
two sources become two tasks of one prepared folder, trained as one union (`method: multitask`, `tasks: []`):

    audioset20k      every clip of the AudioSet-20K lists, all classes of the label csv (`--subset all`)
    vggsound_unused  the complement of a prepared VGGSound task split (`--subset unused`), planned from the same
                     lists and settings that folder's meta.json records, so "unused" means unused by that folder

Class indices: AudioSet's first, then VGGSound's (offset by the number of AudioSet classes). The other init folder,
the full VGGSound train list ('Origin', §2.5), is `stella prep vggsound --subset all`.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from stella_cli.cache import CacheSpec
from stella_cli.errors import StellaError
from stella_cli.prep import RETRIEVAL_PER_CLASS, Plan, plan_real, resolve_lists, write_plan

SOURCE_TASKS = ("audioset20k", "vggsound_unused")


def vggsound_unused_plan(vggsound: Path) -> Plan:
    """The clips a prepared VGGSound task split left out, from the inputs its meta.json records."""
    meta_path = Path(vggsound) / "meta.json"
    if not meta_path.is_file():
        raise StellaError(f"--vggsound {vggsound}: no meta.json; give the folder `stella prep vggsound` wrote "
                          f"for the continual tasks")
    meta = json.loads(meta_path.read_text())
    src = meta.get("sources") or {}
    if meta.get("dataset") != "vggsound" or src.get("subset", "tasks") != "tasks" or "root" not in src:
        raise StellaError(f"{meta_path}: not a VGGSound task split prepared by `stella prep vggsound` "
                          f"(dataset {meta.get('dataset')!r}, subset {src.get('subset', 'tasks')!r})")
    lists = src["lists"] if isinstance(src["lists"], dict) else None  # None: a folder of clips was the list
    inputs = [src["root"], *(lists or {}).values(), *(src[k] for k in ("categories", "labels") if src.get(k))]
    gone = next((f for f in inputs if not Path(f).exists()), None)
    if gone is not None:  # relative paths are relative to where `stella prep vggsound` ran
        raise StellaError(f"{meta_path}: its input {gone} is not found from here; run from the folder that "
                          f"`stella prep vggsound` ran in")
    return plan_real("vggsound", list_file=lists, root=Path(src["root"]), categories=src.get("categories"),
                     labels=src.get("labels"), classes_per_task=src["classes_per_task"],
                     max_train_per_class=src["max_train_per_class"],
                     retrieval_per_class=src.get("retrieval_per_class") or RETRIEVAL_PER_CLASS, subset="unused")


def merge_plans(audioset: Plan, vggsound: Plan) -> Plan:
    """One plan whose tasks are the two sources; VGGSound's class indices follow AudioSet's."""
    offset = len(audioset.classes)
    classes = [replace(c, task=SOURCE_TASKS[0]) for c in audioset.classes]
    classes += [replace(c, task=SOURCE_TASKS[1], index=c.index + offset) for c in vggsound.classes]
    clips = {split: [replace(c, task=SOURCE_TASKS[0]) for c in audioset.clips[split]]
             + [replace(c, task=SOURCE_TASKS[1], label=c.label + offset, labels=[i + offset for i in c.labels])
                for c in vggsound.clips[split]] for split in audioset.clips}
    return Plan("audioset", list(SOURCE_TASKS), classes, clips,
                {s: audioset.missing[s] + vggsound.missing[s] for s in audioset.missing},
                {s: audioset.excluded[s] + vggsound.excluded[s] for s in audioset.excluded},
                [f"audioset20k: {w}" for w in audioset.warnings] + [f"vggsound_unused: {w}" for w in vggsound.warnings],
                {SOURCE_TASKS[0]: audioset.sources, SOURCE_TASKS[1]: vggsound.sources})


def prepare_audioset20k(out: Path, *, list_file: Any, root: Path | None, labels: Path | None, vggsound: Path,
                        workers: int = 2, frames_format: str = "raw", progress: bool = True,
                        spec: CacheSpec | None = None) -> dict[str, Any]:
    """AudioSet-20K (`--list/--root/--labels`) + the VGGSound clips unused by the task split in `vggsound`."""
    t0 = time.perf_counter()
    if list_file is None:
        raise StellaError("stella prep audioset20k: --list is required (train=audioset_20k_cleaned.json,"
                          "test=audioset_eval_cleaned.json, or a folder holding them)")
    lists, found = resolve_lists(list_file, "audioset20k")  # a folder: the 20K train list, not the 2M one
    audioset = plan_real("audioset", list_file=lists, root=root, labels=labels or found.get("labels"), subset="all")
    plan = merge_plans(audioset, vggsound_unused_plan(vggsound))
    return write_plan(plan, Path(out), replace(spec or CacheSpec(), frames_format=frames_format), workers=workers,
                      progress=progress, t0=t0)

