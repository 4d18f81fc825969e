"""The continual loop (train.py): end-to-end runs, run directories, resume equality, signals, NaN, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, RANDOM_START, TASKS, assert_same_weights, bytes_per_clip, final_weights, retrieval_rows,
                     stella_fields, tiny_overrides, tiny_recipe)

from stella_cli.config import load_recipe
from stella_cli.errors import DivergenceError, StellaError
from stella_cli.factory import PAPER_METHODS, recipe_suffix
from stella_cli.train import TrainingInterrupted, run


@pytest.fixture(scope="module")
def stella_run(tmp_path_factory, data_root) -> Path:
    tmp = tmp_path_factory.mktemp("stella")
    return run(tiny_recipe(tmp, data_root), quiet=True)


def test_stella_run_writes_results_checkpoints_and_metrics(stella_run):
    rows = retrieval_rows(stella_run)
    assert [r["after_task"] for r in rows] == TASKS  # one accuracy-matrix row per task
    for row in rows:
        for direction in ("a2v", "v2a"):
            assert set(row["scores"][direction]) == {"all", *TASKS}
            assert 0 <= row["scores"][direction]["all"]["R@1"] <= row["scores"][direction]["all"]["R@10"] <= 100
    summary = json.loads((stella_run / "results" / "summary.json").read_text())
    assert summary["a2v"]["avg"]["A"] is not None and summary["a2v"]["R@1"]["F"] is not None
    assert (stella_run / "results" / "summary.md").is_file() and (stella_run / "results" / "summary.csv").is_file()
    checkpoints = stella_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.pt", "task01_task1.pt", "task02_task2.pt"]
    assert (checkpoints / "latest.pt").samefile(checkpoints / "task02_task2.pt")  # written once, linked
    steps = [json.loads(line) for line in (stella_run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [m for m in steps if "loss" in m]
    assert [m["step"] for m in train_steps] == list(range(1, 9))  # 2 tasks x 4 steps, logged every step
    assert {"loss_mae_a", "loss_mae_v", "loss_con", "loss_vam"} <= train_steps[0].keys()
    assert "loss_pen" not in train_steps[0] and "loss_pen" in train_steps[1]  # the buffer is empty at step 1
    assert all(m["clips_per_s"] > 0 for m in train_steps)
    saved = load_recipe(stella_run / "config.yaml")  # the resolved recipe is kept beside the results
    assert saved.method.name == "stella" and saved.model.embed_dim == 64


def test_each_row_records_the_modality_gap_and_the_bytes_of_a_memory_slot(stella_run):
    """Every accuracy-matrix row holds the modality gap of its gallery (its value: test_eval_run, recomputed from
    the checkpoint) and the memory: 12 slots of STELLA's full clip, targets, p and I + 3 int64 clip ids."""
    r = load_recipe(stella_run / "config.yaml")
    slot = bytes_per_clip(stella_fields(num_frames=r.data.num_frames, image_size=r.data.image_size,
                                        target_length=r.data.target_length, num_mel_bins=r.data.num_mel_bins,
                                        patch_size=r.model.patch_size, embed_dim=r.model.embed_dim,
                                        num_heads=r.model.num_heads)) + 3 * 8
    for row in retrieval_rows(stella_run):
        assert row["memory"] == {"slots": 12, "bytes_per_clip": slot, "filled_rank0": 12, "world_size": 1}
        gap = row["modality_gap"]
        assert 0 < gap["gap"] < 2 and 0 < gap["spread_a"] <= 1 and 0 < gap["spread_v"] <= 1


def test_buffer_is_task_free_and_in_the_checkpoint(stella_run):
    state = torch.load(stella_run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    buffer = state["method_extra"]["buffer"]
    assert buffer["capacity"] == 12 and buffer["n_seen"] == 32  # every clip of both tasks offered, never reset
    assert state["position"]["task"] == 2 and state["position"]["step"] == 8


def test_existing_run_directory_is_never_overwritten(stella_run, data_root):
    recipe = tiny_recipe(stella_run.parent, data_root, stella_run.name)
    before = (stella_run / "checkpoints" / "latest.pt").stat().st_mtime_ns
    with pytest.raises(StellaError, match="already exists: pass --resume"):
        run(recipe, quiet=True)
    assert (stella_run / "checkpoints" / "latest.pt").stat().st_mtime_ns == before
    with pytest.raises(StellaError, match="nothing to resume"):
        run(tiny_recipe(stella_run.parent, data_root, "never_started"), resume=True, quiet=True)


@pytest.mark.parametrize("stop_after", [2, 4, 6])  # mid task 1, at the task boundary, mid task 2
def test_resume_equals_an_uninterrupted_run(tmp_path, data_root, stella_run, stop_after, capsys):
    recipe = tiny_recipe(tmp_path, data_root, "stopped")
    with pytest.raises(TrainingInterrupted, match=f"stopped at step {stop_after}"):
        run(recipe, quiet=True, stop_after=stop_after)
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    assert state["position"]["step"] == stop_after
    run(tiny_recipe(tmp_path, data_root, "stopped", "train.log_every=3"), resume=True, quiet=True)
    assert "ignoring the differing train.log_every" in capsys.readouterr().out  # the run's own recipe wins
    assert_same_weights(final_weights(tmp_path / "stopped"), final_weights(stella_run))
    assert retrieval_rows(tmp_path / "stopped") == retrieval_rows(stella_run)
    steps = [json.loads(line)["step"] for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps == list(range(1, 9))  # no step logged twice


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_in_task_1_then_resume_finishes_identically(tmp_path, data_root, stella_run, sig):
    """SIGTERM: a checkpoint at the next step boundary, exit 130. SIGKILL (a crash, an OOM kill): nothing runs, so
    the time-based checkpoint (train.checkpoint_minutes, here ~every step) is what resume continues from."""
    overrides = [f"data.root={data_root}", "data.num_workers=0", "model.preset=tiny", "method.memory_size=12",
                 "train.epochs=1", "train.batch_size=4", "train.log_every=1", f"output.dir={tmp_path / 'run'}",
                 "train.checkpoint_minutes=0.0001", *RANDOM_START]
    cmd = [sys.executable, "-m", "stella_cli", "train", str(ROOT / "recipes" / "synthetic.yaml"), "--quiet"]
    cmd += [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as the in-process reference run
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics, latest = tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2 and latest.is_file()) \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, out
        assert "checkpoint saved" in out
    else:
        assert proc.returncode == -signal.SIGKILL, out
    state = torch.load(latest, map_location="cpu", weights_only=False)
    assert 1 <= state["position"]["step"] < 4 and state["position"]["task"] == 0  # in the middle of task 1
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed {tmp_path / 'run'} at step {state['position']['step']} " in resumed.stdout
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(stella_run))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch):
    from stella_cli import stella

    original = stella.Stella.step
    calls = {"n": 0}

    def step_with_nan(self, batch):
        calls["n"] += 1
        losses = original(self, batch)
        if calls["n"] == 6:  # second step of task 2
            losses["loss_mae_v"] = losses["loss_mae_v"] * float("nan")
        return losses

    monkeypatch.setattr(stella.Stella, "step", step_with_nan)
    recipe = tiny_recipe(tmp_path, data_root)
    with pytest.raises(DivergenceError, match=r"non-finite loss_mae_v at task 'task2', epoch 0, step 6 .*loss_mae_v=nan"
                                              r".*the last good checkpoint is .*task01_task1.pt"):
        run(recipe, quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    assert state["position"] == {"task": 1, "epoch": 0, "batch": 0, "step": 4, "history": state["position"]["history"]}


def test_finetune_and_multitask_and_stella_plus(tmp_path, data_root):
    finetune = run(tiny_recipe(tmp_path, data_root, "ft", "method.name=finetune"), quiet=True)
    assert [r["after_task"] for r in retrieval_rows(finetune)] == TASKS
    state = torch.load(finetune / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    assert state["method"] == {} and "buffer" not in state["method_extra"]  # no AVM, no memory
    multitask = run(tiny_recipe(tmp_path, data_root, "mt", "method.name=multitask"), quiet=True)
    assert [r["after_task"] for r in retrieval_rows(multitask)] == ["all"]  # one joint run over the union
    summary = json.loads((multitask / "results" / "summary.json").read_text())
    assert summary["a2v"]["R@1"]["F"] is None and summary["a2v"]["R@1"]["A"] is not None
    plus = run(tiny_recipe(tmp_path, data_root, "plus", "method.name=stella+"), quiet=True)
    buffer = torch.load(plus / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)[
        "method_extra"]["buffer"]
    assert {"core_v", "core_a", "order_v", "order_a"} <= set(buffer["fields"]) and "video" not in buffer["fields"]


# every method of the paper's tables from its own recipe (STELLA itself is resumed by the tests above)
RECIPE_METHODS = [recipe_suffix(m) for m in PAPER_METHODS if m != "stella"]


@pytest.mark.parametrize("method", RECIPE_METHODS)
def test_every_method_trains_from_its_recipe_and_resumes_exactly(tmp_path, data_root, method):
    """`stella train recipes/synthetic_<method>.yaml` writes the accuracy matrix; a run stopped mid task 2 and
    resumed ends with the same weights (teachers included), the same EMA counters and the same results."""
    from typer.testing import CliRunner

    from stella_cli.cli import app

    recipe = f"synthetic_{method}.yaml"
    sets = [x for o in tiny_overrides(tmp_path, data_root, "full") for x in ("--set", o)]
    result = CliRunner().invoke(app, ["train", str(ROOT / "recipes" / recipe), "--quiet", *sets])
    assert result.exit_code == 0, result.output
    full = tmp_path / "full"
    assert [r["after_task"] for r in retrieval_rows(full)] == (["all"] if method == "multitask" else TASKS)
    assert (full / "results" / "summary.json").is_file()
    with pytest.raises(TrainingInterrupted, match="stopped at step 5"):
        run(tiny_recipe(tmp_path, data_root, "stopped", recipe=recipe), quiet=True, stop_after=5)
    run(tiny_recipe(tmp_path, data_root, "stopped", recipe=recipe), resume=True, quiet=True)
    assert_same_weights(final_weights(tmp_path / "stopped"), final_weights(full))
    assert retrieval_rows(tmp_path / "stopped") == retrieval_rows(full)
    extra = [torch.load(d / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["method_extra"]
             for d in (full, tmp_path / "stopped")]
    assert {k: v for k, v in extra[0].items() if k not in ("buffer", "generators")} == \
        {k: v for k, v in extra[1].items() if k not in ("buffer", "generators")}  # EMA counters, loss statistics
    if "buffer" in extra[0]:
        assert all(torch.equal(extra[0]["buffer"]["fields"][k], extra[1]["buffer"]["fields"][k])
                   for k in extra[0]["buffer"]["fields"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, data_root: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    overrides = [f"data.root={data_root}", "data.num_workers=0", "model.preset=tiny", "method.memory_size=12",
                 "train.epochs=1", "train.batch_size=4", f"output.dir={tmp_path / name}", *RANDOM_START]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "stella_cli", "train", str(ROOT / "recipes" / "synthetic.yaml"),
           "--quiet", *extra] + [x for o in overrides for x in ("--set", o)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_process_ddp_run_with_torchrun_and_its_resume(tmp_path, data_root):
    """torchrun + gloo on CPU: per-rank buffers (memory // 2), sharded data, rank 0 writes the results; a run
    stopped mid-task and resumed with 2 processes ends with the same weights."""
    done = torchrun(tmp_path, data_root, "ddp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("zero-shot retrieval") == 1  # only rank 0 prints the table ...
    assert done.stdout.count("after task1:") == 1  # ... and the retrieval lines (which --quiet keeps)
    run_dir = tmp_path / "ddp"
    assert [r["after_task"] for r in retrieval_rows(run_dir)] == TASKS
    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    assert state["world_size"] == 2
    ranks = state["method_extra"]["buffer"]["ranks"]  # one merged buffer, split again on resume
    assert [r["capacity"] for r in ranks] == [6, 6]  # memory_size 12 split over 2 ranks
    assert [r["n_seen"] for r in ranks] == [16, 16]  # each rank saw its half of the 32 training clips
    assert len(state["method_extra"]["per_rank"]) == 2  # each rank's generator states
    assert state["position"]["step"] == 8  # global batch 4 = 2 per rank: 16 clips per task / 4

    stopped = torchrun(tmp_path, data_root, "ddp_stopped", "--stop-after", "3")
    # torchrun exits 1 once a child exits 130 (a saved stop); which child it names first is a race, so the test
    # checks the checkpoint, which every rank waits for (a barrier) before exiting
    assert stopped.returncode != 0, stopped.stderr[-4000:]
    stop_state = torch.load(tmp_path / "ddp_stopped" / "checkpoints" / "latest.pt", map_location="cpu",
                            weights_only=False)
    assert stop_state["position"]["step"] == 3 and stop_state["position"]["task"] == 0
    resumed = torchrun(tmp_path, data_root, "ddp_stopped", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "ddp_stopped"), final_weights(run_dir))
