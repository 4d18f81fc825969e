"""Training curves (tracking.py): metrics.jsonl truncation on resume, the tracker scalars, TensorBoard event files
read back (steps and values, across a resume after a simulated hard kill), and the one-line errors of train.log_to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, tiny_overrides, tiny_recipe

from stella_cli.config import RecipeError, load_recipe
from stella_cli.errors import StellaError
from stella_cli.tracking import TensorBoardTracker, read_metrics, scalars, truncate_metrics
from stella_cli.train import TrainingInterrupted, run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def step_line(step: int, task: str = "t1", **losses: float) -> dict:
    return {"step": step, "time": 1000.0 + step, "task": task, "epoch": 0, **losses, "loss": sum(losses.values()),
            "clips_per_s": 10.0 + step, "lr": 1e-4}


def retrieval_line(step: int, after: str) -> dict:
    return {"step": step, "time": 2000.0 + step, "event": "retrieval", "after_task": after,
            "scores": {d: {"all": {"R@1": 10.0, "MedR": 3.0}, "t1": {"R@1": 20.0, "MedR": 2.0}}
                       for d in ("a2v", "v2a")}}


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl and the scalars


def test_scalars_of_a_training_line_and_a_retrieval_line():
    assert scalars(step_line(3, loss_mae_a=1.0, loss_pen=0.25)) == {
        "loss/mae_a": 1.0, "loss/pen": 0.25, "loss/total": 1.25, "train/clips_per_s": 13.0, "train/lr": 1e-4}
    assert scalars(retrieval_line(4, "t1")) == {
        "retrieval/a2v_R@1": 10.0, "retrieval/a2v_MedR": 3.0, "retrieval_per_task/a2v_R@1/t1": 20.0,
        "retrieval_per_task/a2v_MedR/t1": 2.0, "retrieval/v2a_R@1": 10.0, "retrieval/v2a_MedR": 3.0,
        "retrieval_per_task/v2a_R@1/t1": 20.0, "retrieval_per_task/v2a_MedR/t1": 2.0}


@pytest.mark.parametrize("evaluations", [1, 0])
def test_truncate_keeps_the_checkpoints_past(tmp_path, evaluations):
    """Steps 1-6 and the retrieval after task t1 (step 4) were logged, then a hard kill cut line 8 short. From the
    step-4 checkpoint written after that retrieval (evaluations=1) the retrieval line stays; from the step-4
    checkpoint written before it (checkpoint_every landing on the task's last step: evaluations=0) it goes, since
    the resumed run evaluates t1 again."""
    path = tmp_path / "metrics.jsonl"
    lines = [step_line(s, loss_mae_a=1.0) for s in range(1, 5)] + [retrieval_line(4, "t1")] + \
            [step_line(s, "t2", loss_mae_a=1.0) for s in (5, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "ti')
    kept, last = truncate_metrics(path, 4, evaluations)
    assert last == 6  # the killed run's last complete line
    assert [(r["step"], r.get("event")) for r in kept] == [(1, None), (2, None), (3, None), (4, None)] + \
        [(4, "retrieval")] * evaluations
    assert read_metrics(path) == kept  # the file holds exactly the kept lines


def test_a_broken_line_inside_metrics_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(step_line(1)) + "\nnot json\n" + json.dumps(step_line(2)) + "\n")
    with pytest.raises(StellaError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(path)


# ----------------------------------------------------------------------------------------------------------
# TensorBoard, read back


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: every scalar tag's (step, value) after its purges (EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_steps(folder: Path, tag: str) -> list[int]:
    """Every step written for `tag` over all event files, purged or not."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        steps += [e.step for e in EventFileLoader(str(path)).Load() for v in e.summary.value if v.tag == tag]
    return steps


def expected_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for tag, value in scalars(record).items():
            curves.setdefault(tag, []).append((record["step"], value))
    return curves


def assert_curves_equal(shown: dict, expected: dict) -> None:
    assert shown.keys() == expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in shown[tag]] == [s for s, _ in points], tag
        assert [v for _, v in shown[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_tensorboard_event_files_hold_the_scalars_and_a_resume_continues_them(tmp_path, data_root, monkeypatch):
    """Stop at step 3 (checkpoint), resume and stop at step 6 (past task t1's retrieval at step 4), then put the
    step-3 checkpoint back as latest.pt: a hard kill at step 6 whose last checkpoint was step 3. The last resume
    logs steps 3-8 again; TensorBoard must show every step once, with the last run's values."""
    recipe = tiny_recipe(tmp_path, data_root, "run", "train.log_to=tensorboard")
    run_dir, latest = tmp_path / "run", tmp_path / "run" / "checkpoints" / "latest.pt"
    unclosed = []  # the first run's writer is left open, as by a kill -9: its events reach the disk by the checkpoint
    monkeypatch.setattr(TensorBoardTracker, "close", lambda self: unclosed.append(self))
    with pytest.raises(TrainingInterrupted):
        run(recipe, quiet=True, stop_after=3)
    assert raw_steps(run_dir / "tensorboard", "loss/total") == [1, 2, 3]
    monkeypatch.undo()
    unclosed[0].close()
    shutil.copy(latest, tmp_path / "step3.pt")
    with pytest.raises(TrainingInterrupted):
        run(recipe, resume=True, quiet=True, stop_after=6)
    assert [s for s, _ in event_scalars(run_dir / "tensorboard")["loss/total"]] == list(range(1, 7))
    latest.unlink()
    shutil.copy(tmp_path / "step3.pt", latest)
    run(recipe, resume=True, quiet=True)

    shown, expected = event_scalars(run_dir / "tensorboard"), expected_curves(run_dir)
    assert_curves_equal(shown, expected)
    assert [s for s, _ in shown["loss/total"]] == list(range(1, 9))  # 2 tasks x 4 steps, each once
    assert [s for s, _ in shown["loss/pen"]] == list(range(2, 9))  # the buffer is empty at step 1
    assert [s for s, _ in shown["retrieval/a2v_R@1"]] == [4, 8]  # after each task
    assert {"loss/mae_a", "loss/mae_v", "loss/con", "loss/vam", "train/lr", "train/clips_per_s",
            "retrieval_per_task/v2a_R@10/task2"} <= shown.keys()
    # the files hold steps 3-6 twice and the retrieval after t1 twice: the purges, not luck, removed them
    assert raw_steps(run_dir / "tensorboard", "loss/total") == [1, 2, 3, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8]
    assert raw_steps(run_dir / "tensorboard", "retrieval/a2v_R@1") == [4, 4, 8]
    # each point shows the last run's value: clips/s is measured anew, so it tells the runs apart
    assert [round(r["clips_per_s"], 3) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == \
        [round(v, 3) for _, v in shown["train/clips_per_s"]]


def test_a_deleted_tensorboard_folder_is_rebuilt_from_metrics_on_resume(tmp_path, data_root):
    recipe = tiny_recipe(tmp_path, data_root, "run", "train.log_to=tensorboard")
    with pytest.raises(TrainingInterrupted):
        run(recipe, quiet=True, stop_after=5)
    shutil.rmtree(tmp_path / "run" / "tensorboard")
    run(recipe, resume=True, quiet=True)
    shown = event_scalars(tmp_path / "run" / "tensorboard")
    assert_curves_equal(shown, expected_curves(tmp_path / "run"))
    assert [s for s, _ in shown["loss/total"]] == list(range(1, 9))


# ----------------------------------------------------------------------------------------------------------
# train.log_to through the CLI: wrong values and missing packages


def train_cli(tmp_path: Path, data_root: Path, *overrides: str, pythonpath: str = str(ROOT)):
    args = [a for o in tiny_overrides(tmp_path, data_root, "run") + list(overrides) for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "stella_cli", "train", str(ROOT / "recipes" / "synthetic.yaml"),
                           "--quiet", *args], capture_output=True, text=True, env={**ENV, "PYTHONPATH": pythonpath},
                          timeout=300)


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and all(p in lines[0] for p in phrases), lines


def test_a_missing_tracker_package_is_one_line_before_any_data_is_read(tmp_path):
    """tensorboard hidden by a package of that name that fails to import; the data folder does not exist, so the
    error shows the check comes first; nothing is written."""
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboard'\")\n")
    proc = train_cli(tmp_path, tmp_path / "no_data", "train.log_to=tensorboard",
                     pythonpath=f"{shadow.parent}{os.pathsep}{ROOT}")
    assert_one_line_exit_2(proc, "train.log_to=tensorboard: the tensorboard package is not installed",
                           "pip install 'stella-cli[tb]'")
    assert not (tmp_path / "run").exists()


def test_wandb_missing_and_a_misspelt_tracker(tmp_path):
    with pytest.raises(RecipeError, match="train.log_to: 'tensorbord' is not one of none, tensorboard, wandb "
                                          r"\(did you mean 'tensorboard'\?\)"):
        load_recipe(ROOT / "recipes" / "synthetic.yaml", ["train.log_to=tensorbord"])
    try:
        import wandb  # noqa: F401
    except ImportError:
        proc = train_cli(tmp_path, tmp_path / "no_data", "train.log_to=wandb")
        assert_one_line_exit_2(proc, "the wandb package is not installed", "pip install wandb")
        assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# W&B: what is sent (a recording stand-in for the wandb module), and a real offline run where wandb is installed


class FakeWandb:
    """Records wandb.init's arguments and every (step, keys) sent."""

    def __init__(self):
        self.inits, self.sent = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step):
        self.sent.append((step, sorted(values)[0]))

    def finish(self):
        pass


def test_wandb_is_sent_each_step_once_across_a_resume(tmp_path, monkeypatch):
    """Steps 1-6 and the retrieval after t1 (step 4) were sent before a hard kill; the run resumes from its step-3
    checkpoint and logs steps 4-8 again: W&B, which cannot forget a step, is sent only 7, 8 and the last retrieval.
    A run whose W&B folder is gone is sent every kept line first."""
    from stella_cli.tracking import MetricsLog

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    lines = [step_line(s, loss_mae_a=1.0) for s in range(1, 5)] + [retrieval_line(4, "t1")] + \
            [step_line(s, "t2", loss_mae_a=1.0) for s in (5, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "run_id").write_text("abc123\n")
    log = MetricsLog(tmp_path, "wandb", {"train": {"seed": 1}}, resume_step=3, evaluations=0)
    for record in [step_line(4, loss_mae_a=1.0), retrieval_line(4, "t1")] + \
            [step_line(s, "t2", loss_mae_a=1.0) for s in (5, 6, 7, 8)] + [retrieval_line(8, "t2")]:
        log.log(record)
    assert fake.sent == [(7, "loss/mae_a"), (8, "loss/mae_a"), (8, "retrieval/a2v_MedR")]
    assert fake.inits == [{"project": "stella", "name": tmp_path.name, "id": "abc123", "resume": "allow",
                           "dir": str(tmp_path), "config": {"train": {"seed": 1}}, "mode": "offline"}]
    shutil.rmtree(tmp_path / "wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    fake.sent.clear()
    MetricsLog(tmp_path, "wandb", {}, resume_step=5, evaluations=1)
    assert [s for s, _ in fake.sent] == [1, 2, 3, 4, 4, 5] and fake.inits[-1]["mode"] == "online"
    new_id = (tmp_path / "wandb" / "run_id").read_text()
    assert len(new_id) == 16 and new_id != "abc123"  # a new W&B run


def wandb_history(path: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, scalars) of every history record of an offline .wandb file: a 7-byte header, then 32 KiB blocks of
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) holding wandb's Record protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                rows.append((record.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
    return rows


def test_wandb_offline_run_read_back_across_a_hard_kill(tmp_path, data_root):
    """Only where wandb is installed (it is not a test dependency: 125 MB). The same kill as the TensorBoard test:
    each step is in exactly one of the three offline sessions of one W&B run, with metrics.jsonl's values."""
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb to run this test)")
    recipe = tiny_recipe(tmp_path, data_root, "run", "train.log_to=wandb")
    run_dir, latest = tmp_path / "run", tmp_path / "run" / "checkpoints" / "latest.pt"
    with pytest.raises(TrainingInterrupted):
        run(recipe, quiet=True, stop_after=3)
    shutil.copy(latest, tmp_path / "step3.pt")
    with pytest.raises(TrainingInterrupted):
        run(recipe, resume=True, quiet=True, stop_after=6)
    latest.unlink()
    shutil.copy(tmp_path / "step3.pt", latest)
    run(recipe, resume=True, quiet=True)
    wandb.teardown()  # what a process does at exit: the service has written every record when it returns
    run_id = (run_dir / "wandb" / "run_id").read_text()
    sessions = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    rows = [row for s in sessions for row in wandb_history(s / f"run-{run_id}.wandb")]
    assert len(sessions) == 3 and [step for step, _ in rows] == list(range(1, 9))
    expected = {r["step"]: scalars(r)["loss/total"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert {step: values["loss/total"] for step, values in rows} == pytest.approx(expected, rel=1e-12)
    assert [step for step, values in rows if "retrieval/a2v_R@1" in values] == [4, 8]


def test_a_start_that_logged_before_its_first_checkpoint_is_reused(tmp_path, data_root):
    """A start that died before its first checkpoint with a tracker on leaves RUN/tensorboard or RUN/wandb: the next
    start still reuses the folder, and begins the curves afresh."""
    from stella_cli.train import is_empty_claim, prepare_run_dir

    recipe = tiny_recipe(tmp_path, data_root, "run", "train.log_to=tensorboard")
    run_dir = prepare_run_dir(recipe, resume=False)
    for name in ("tensorboard", "wandb"):
        (run_dir / name).mkdir()
        (run_dir / name / "left_behind").write_text("x")
    (run_dir / "metrics.jsonl").write_text(json.dumps(step_line(1)) + "\n")
    assert is_empty_claim(run_dir)
    prepare_run_dir(recipe, resume=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "results"]
