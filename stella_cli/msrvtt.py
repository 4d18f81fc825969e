"""MSR-VTT-style transfer (method.md §6.3): more pre-training on a new domain, then zero-shot retrieval.

Not a head: from the final continual checkpoint, `eval.msrvtt.epochs` (15) more epochs of MAE + contrastive
training (the Finetune learner, the recipe's optimiser at constant LR, as the authors' run_task_free) on the new
domain's train list, then zero-shot A->V and V->A retrieval on its test list (the `retrieval` split). The transfer
is an ordinary `stella train` run in RUN/results/msrvtt_transfer/, so it checkpoints, logs and can be inspected
like any run. The zero-shot score of the checkpoint before the transfer is reported too. `stella prep msrvtt`
(prep_downstream.py) prepares the lists; the synthetic benchmark's held-out domain (synth.py) is the default.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from stella_cli import evaluate
from stella_cli.cache import read_meta
from stella_cli.checkpoint import write_checkpoint
from stella_cli.config import OutputConfig
from stella_cli.downstream import Context, TaskSkipped
from stella_cli.errors import StellaError
from stella_cli.files import make_dir
from stella_cli.synth import HELDOUT_TASKS, heldout_dir
from stella_cli.train import run as train_run


def run_msrvtt(ctx: Context) -> tuple[dict[str, Any], list[list[str]]]:
    """`stella eval --task msrvtt`: transfer from the final checkpoint, zero-shot retrieval before and after."""
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
            raise StellaError(f"{transfer_dir}: exists and is not a transfer run; move it away")
        shutil.rmtree(transfer_dir)
    make_dir(transfer_dir)
    loaded = ctx.load()
    before = evaluate.gallery_scores(loaded.backbone, dataclasses.replace(r, data=data), list(tasks), ctx.device,
                                     ctx.amp)
    start = transfer_dir / "start_backbone.pt"
    write_checkpoint(start, loaded.backbone.state_dict())
    recipe = dataclasses.replace(
        r, data=data, model=dataclasses.replace(r.model, checkpoint=str(start)),
        method=dataclasses.replace(r.method, name="finetune"), train=dataclasses.replace(r.train, epochs=cfg.epochs),
        eval=dataclasses.replace(r.eval, retrieval=True), output=OutputConfig(dir=str(transfer_dir / "run")))
    ctx.log(f"msrvtt: {cfg.epochs} epochs of MAE + contrastive training on {root} ({', '.join(tasks)})")
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
