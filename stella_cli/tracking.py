"""Training curves: RUN/metrics.jsonl and its live mirror in TensorBoard or W&B (`train.log_to`), from rank 0.

Every record `stella train` logs (a training step every `train.log_every` steps, retrieval after each task) is one
JSON line of metrics.jsonl and the same scalars in the tracker, at the same step (optimiser steps so far):

    loss/total, loss/<term>                    the summed loss, each weighted term ("loss_mae_a" -> loss/mae_a)
    train/lr, train/clips_per_s                the learning rate, current clips of all ranks per second
    retrieval/<dir>_<metric>                   R@K and MedR of the whole gallery after each task, a2v and v2a
    retrieval_per_task/<dir>_<metric>/<task>   the same for each task's queries (a row of the accuracy matrix)

Resume continues the same curves: metrics.jsonl keeps the lines of the checkpoint's past only, TensorBoard is told
to drop what a killed run wrote after the checkpoint (purge_step) and W&B, which cannot drop, is sent only steps
it has not had. The tracker packages are optional: `check_tracker` refuses a missing one before any data is read.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from stella_cli.errors import StellaError
from stella_cli.files import append_text, atomic_write_text

METRICS = "metrics.jsonl"
TRACKERS = ("tensorboard", "wandb")  # train.log_to values with a tracker, each writing RUN/<name>/
INSTALL = {"tensorboard": "pip install 'stella-cli[tb]' (or pip install tensorboard)",
           "wandb": "pip install wandb"}
NOT_SCALARS = ("step", "time", "epoch")  # every other number of a training line is a curve


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut short by a hard kill is left out."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise StellaError(f"{path}:{number}: not a JSON line; remove the line to continue") from None
    return records


def truncate_metrics(path: Path, step: int, evaluations: int) -> tuple[list[dict[str, Any]], int]:
    """Keep the lines of the checkpoint's past: training lines up to its `step` and its first `evaluations`
    retrieval lines (a run killed after a task's retrieval but before that task's checkpoint logged one more).
    Returns the kept records and the last step the file held (what a tracker may already have)."""
    records = read_metrics(path)
    kept, seen = [], 0
    for record in records:
        if record.get("event") == "retrieval":
            seen += 1
            if seen > evaluations:
                continue
        if record["step"] <= step:
            kept.append(record)
    if path.is_file():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept, max((r["step"] for r in records), default=0)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars (names in the module docstring)."""
    if record.get("event") == "retrieval":
        out = {}
        for direction, by_task in record["scores"].items():
            for task, metrics in by_task.items():
                for metric, value in metrics.items():
                    name = f"{direction}_{metric}"
                    out[f"retrieval/{name}" if task == "all" else f"retrieval_per_task/{name}/{task}"] = value
        return out
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key == "loss":
            out["loss/total"] = value
        elif key.startswith("loss_"):
            out[f"loss/{key.removeprefix('loss_')}"] = value
        else:
            out[f"train/{key}"] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# trackers


def check_tracker(log_to: str) -> None:
    """The package train.log_to needs is importable; otherwise one line saying how to install it (exit 2)."""
    if log_to == "none":
        return
    try:
        if log_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        else:
            import wandb  # noqa: F401
    except ImportError as err:
        raise StellaError(f"train.log_to={log_to}: the {log_to} package is not installed ({err}); "
                          f"{INSTALL[log_to]}, or set train.log_to=none") from None


class Tracker:
    """train.log_to=none: the scalars go to metrics.jsonl only."""

    def log(self, step: int, values: dict[str, float], walltime: float | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard/, one per start or resume; `purge_step` makes TensorBoard drop the steps from
    there on that earlier files hold (a killed run's steps after its last checkpoint)."""

    def __init__(self, folder: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step, flush_secs=30)

    def log(self, step: int, values: dict[str, float], walltime: float | None = None) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step, walltime=walltime)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """One W&B run per run directory (its id in RUN/wandb/run_id, each start's files in RUN/wandb/offline-run-*),
    offline unless WANDB_MODE says otherwise. W&B cannot forget a step, so only steps after `sent_through` are sent
    (a resumed run's steps up to the last one the killed run logged are there already)."""

    def __init__(self, folder: Path, name: str, config: dict[str, Any], sent_through: int):
        import wandb

        id_file = folder / "run_id"
        folder.mkdir(parents=True, exist_ok=True)
        if not id_file.is_file():
            atomic_write_text(id_file, uuid.uuid4().hex[:16])
        self.sent_through = sent_through
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "stella"), name=name,
                              id=id_file.read_text().strip(), resume="allow", dir=str(folder.parent), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, step: int, values: dict[str, float], walltime: float | None = None) -> None:
        if step > self.sent_through:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def has_data(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


class MetricsLog:
    """RUN/metrics.jsonl and the tracker of train.log_to, written by rank 0 only.

    `resume_step`: the step of the checkpoint a resumed run continues from (None for a new run); `evaluations`:
    the retrieval rows that checkpoint holds. A tracker that has nothing of this run yet (a new run, or its folder
    deleted) is given every kept line of metrics.jsonl first, so its curves start at step 1.
    """

    def __init__(self, run_dir: Path, log_to: str, config: dict[str, Any], resume_step: int | None = None,
                 evaluations: int = 0):
        self.path = run_dir / METRICS
        kept, sent_through = ([], 0) if resume_step is None else truncate_metrics(self.path, resume_step, evaluations)
        self.tracker, replay = Tracker(), []
        folder = run_dir / log_to  # RUN/tensorboard, RUN/wandb
        fresh = resume_step is None or not has_data(folder)
        if log_to == "tensorboard":  # from the checkpoint's step on: its own lines again, then the new ones
            self.tracker = TensorBoardTracker(folder, None if fresh else resume_step)
            replay = kept if fresh else [r for r in kept if r["step"] >= resume_step]
        elif log_to == "wandb":
            self.tracker = WandbTracker(folder, run_dir.name, config, 0 if fresh else sent_through)
            replay = kept
        for record in replay:
            self.tracker.log(record["step"], scalars(record), record.get("time"))

    def log(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (record has 'step' and 'time') and its scalars in the tracker."""
        append_text(self.path, json.dumps(record) + "\n")
        self.tracker.log(record["step"], scalars(record), record["time"])

    def flush(self) -> None:
        """Everything logged so far on disk (before each checkpoint)."""
        self.tracker.flush()

    def close(self) -> None:
        self.tracker.close()
