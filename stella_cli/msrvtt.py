"""MSR-VTT-style transfer (stella_spec §6.3): more pre-training on a new domain, then zero-shot retrieval.

Not a head: from the final continual checkpoint, `eval.msrvtt.epochs` (15) more epochs of MAE + contrastive
training (the Finetune learner, the recipe's optimiser at constant LR, as the authors' run_task_free) on the new
domain's train list, then zero-shot A->V and V->A retrieval on its test list (the `retrieval` split). The transfer
is an ordinary `stella train` run in RUN/results/msrvtt_transfer/, so it checkpoints, logs and can be inspected
like any run. The zero-shot score of the checkpoint before the transfer is reported too.

`stella prep msrvtt` reads the lists: one video id a line, or a csv with a `video_id` column (Miech's
MSRVTT_train.9k.csv, the JSFusion test csv MSRVTT_JSFUSION_test.csv); videos without audio are skipped and
reported (prep_report.json), and so are listed videos with no file under --root.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from stella_cli.cache import CacheSpec, read_meta
from stella_cli.config import OutputConfig
from stella_cli.heads import TaskSkipped
from stella_cli.prep import ClipSource, MediaIndex, _Entry
from stella_cli.prep_tasks import write_prepared
from stella_cli.synth_heldout import HELDOUT_TASKS, heldout_dir

MSRVTT_LISTS = {"train": ["MSRVTT_train.9k.csv", "train_list.txt", "train.txt"],
                "retrieval": ["MSRVTT_JSFUSION_test.csv", "test_list.txt", "test.txt"]}


def read_video_list(path: Path) -> list[tuple[str, str]]:
    """[(video id, file:line)] of a list: a csv whose header has `video_id`, or one id per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MSR-VTT list not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    head = [h.strip() for h in next(csv.reader(lines[:1]), [])]
    if "video_id" in head:
        col = head.index("video_id")
        out = []
        for line_no, row in enumerate(csv.reader(lines[1:]), start=2):
            if not row:
                continue
            if len(row) <= col or not row[col].strip():
                raise ValueError(f"{path}:{line_no}: no video_id in column {col + 1}: {row}")
            out.append((row[col].strip(), f"{path}:{line_no}"))
        return out
    out = []
    for line_no, line in enumerate(lines, start=1):
        vid = line.strip()
        if vid:
            if "," in vid or " " in vid:
                raise ValueError(f"{path}:{line_no}: expected one video id a line (or a csv with a video_id "
                                 f"column), got {vid!r}")
            out.append((vid, f"{path}:{line_no}"))
    return out


def prepare_msrvtt(out: Path, *, root: Path, lists: Path, workers: int = 2, frames_format: str = "raw",
                   progress: bool = True, spec: CacheSpec | None = None) -> dict[str, Any]:
    """`stella prep msrvtt`: `lists` is the folder holding the train and test lists under their usual names
    (MSRVTT_LISTS), or `train=FILE,test=FILE`. The test list becomes the `retrieval` split."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root}: folder of MSR-VTT videos not found")
    files = resolve_msrvtt_lists(lists)
    index = MediaIndex(root)
    clips, missing = {}, {}
    for split, path in files.items():
        clips[split], missing[split], seen = [], [], set()
        for vid, where in read_video_list(path):
            if vid in seen:
                continue
            seen.add(vid)
            media = index.find(_Entry(vid, [], [vid], vid, where))
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
                raise FileNotFoundError(f"{text}: no {split} list (looked for {names})")
            found[split] = hit
        return found
    found = {}
    for part in text.split(","):
        split, sep, file = part.partition("=")
        split = {"test": "retrieval"}.get(split.strip(), split.strip())
        if not sep or split not in MSRVTT_LISTS:
            raise ValueError(f"--list {part}: give train=FILE,test=FILE or a folder holding {MSRVTT_LISTS}")
        found[split] = Path(file.strip())
    if set(found) != set(MSRVTT_LISTS):
        raise ValueError(f"--list {text}: both train= and test= lists are required")
    return found


def run_msrvtt(ctx) -> tuple[dict[str, Any], list[list[str]]]:
    """`stella eval --task msrvtt`: transfer from the final checkpoint, zero-shot retrieval before and after."""
    from stella_cli import evaluate
    from stella_cli.eval_run import load_checkpoint, log
    from stella_cli.train import run as train_run

    r, cfg = ctx.target.recipe, ctx.target.recipe.eval.msrvtt
    synthetic = r.data.dataset == "synthetic"
    root = Path(cfg.root or (heldout_dir(r.data.root) if synthetic else ""))
    if not cfg.root and not synthetic:
        raise TaskSkipped("no MSR-VTT data: prepare it with `stella prep msrvtt` and set eval.msrvtt.root")
    if not (root / "meta.json").is_file():
        hint = ("`stella prep synthetic` writes it beside the benchmark" if synthetic and not cfg.root
                else "`stella prep msrvtt`")
        raise TaskSkipped(f"{root}: no prepared transfer domain ({hint})")
    meta = read_meta(root)
    tasks = cfg.tasks or (HELDOUT_TASKS if meta["dataset"] == "synthetic" else meta["tasks"])
    data = dataclasses.replace(r.data, root=str(root), dataset=meta["dataset"], tasks=list(tasks))
    transfer_dir = ctx.target.results_dir / "msrvtt_transfer"
    if transfer_dir.exists():  # a previous transfer of this command: start again
        if not (transfer_dir / "config.yaml").is_file():
            raise FileExistsError(f"{transfer_dir}: exists and is not a transfer run; move it away")
        shutil.rmtree(transfer_dir)
    transfer_dir.mkdir(parents=True)
    loaded = load_checkpoint(ctx.target.final, r, ctx.device)
    before = evaluate.gallery_scores(loaded.backbone, dataclasses.replace(r, data=data), list(tasks), ctx.device,
                                     ctx.amp)
    start = transfer_dir / "start_backbone.pt"
    torch.save(loaded.backbone.state_dict(), start)
    recipe = dataclasses.replace(
        r, data=data, model=dataclasses.replace(r.model, checkpoint=str(start)),
        method=dataclasses.replace(r.method, name="finetune"), train=dataclasses.replace(r.train, epochs=cfg.epochs),
        eval=dataclasses.replace(r.eval, retrieval=True), output=OutputConfig(dir=str(transfer_dir / "run")))
    log(ctx, f"msrvtt: {cfg.epochs} epochs of MAE + contrastive training on {root} ({', '.join(tasks)})")
    run_dir = train_run(recipe, quiet=ctx.quiet)
    after = json.loads((run_dir / "results" / "retrieval.json").read_text())["rows"][-1]["scores"]
    metrics = {}
    table = [["transfer", "A->V R@1", "R@5", "R@10", "MedR", "V->A R@1", "R@5", "R@10", "MedR"]]
    for name, scores in (("before", before), ("after", after)):
        row = [name]
        for d in evaluate.DIRECTIONS:
            s = scores[d]["all"]
            for k, v in s.items():
                metrics[f"{d} {k} {name}"] = v
            row += [f"{s[k]:.2f}" for k in s]
        table.append(row)
    return {"metrics": metrics, "data_root": str(root), "tasks": list(tasks), "epochs": cfg.epochs,
            "transfer_run": str(run_dir), "before": before, "after": after}, table
