"""Every failure path through the real CLI (subprocess): exit code, one line and no traceback, and a following
correct command that succeeds without manual clean-up. Exit codes: 2 bad input, 3 divergence, 130 interrupted.

Resume after kill -9 in the middle of task 1 is in test_train.py (test_a_signal_in_task_1_then_resume_...).
"""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import RANDOM_START, tiny_synthetic

from stella_cli.cache import check_folder
from stella_cli.config import load_recipe
from stella_cli.files import lock, unlock
from stella_cli.synth import SynthConfig, prepare_synthetic
from stella_cli.train import TrainingInterrupted, run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PREP_FIX = Path(__file__).parent / "data" / "prep"


def tiny(data_root: Path, out: Path, *overrides: str) -> list[str]:
    sets = [f"data.root={data_root}", "data.num_workers=0", "model.preset=tiny", "method.memory_size=12",
            "train.epochs=1", "train.batch_size=4", f"output.dir={out}", *RANDOM_START, *overrides]
    return [x for o in sets for x in ("--set", o)]


def train_cmd(data_root: Path, out: Path, *overrides: str, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "stella_cli", "train", str(ROOT / "recipes" / "synthetic.yaml"), "--quiet",
            *tiny(data_root, out, *overrides), *(["--resume"] if resume else [])]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stella_cli", *args]


def run_all(cmds: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run independent commands side by side (most of their time is importing torch)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for c in cmds]
    done = []
    for cmd, p in zip(cmds, procs):
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    return done


def assert_one_line(result: subprocess.CompletedProcess, code: int, *parts: str) -> str:
    """Exit `code`, and the error is a single line holding every part; no traceback anywhere."""
    text = result.stdout + result.stderr
    assert result.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-3000:]
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def assert_nothing_blocks(run_dir: Path) -> None:
    """A start that failed left no run behind: no folder, or one without a checkpoint."""
    assert not run_dir.exists() or not list((run_dir / "checkpoints").glob("*.pt"))


# ----------------------------------------------------------------------------------------------------------
# training


def test_real_divergence_stops_every_method_through_the_guard(tmp_path, data_root):
    """optim.lr=1e10 on the tiny preset: NaN weights after the first step. STELLA meets them first in the AVM logits,
    importance and RCA probabilities (before torch.bernoulli / multinomial); every method stops with exit 3."""
    methods = ["stella", "stella+", "finetune"]  # multitask is finetune's learner on one joint task
    results = run_all([train_cmd(data_root, tmp_path / m, "optim.lr=1e10", f"method.name={m}") for m in methods])
    for method, result in zip(methods, results):
        line = assert_one_line(result, 3, "at task 'task1', epoch 0, step 2", "loss_mae_v=nan",
                               "training diverged", "no checkpoint was written yet")
        if method.startswith("stella"):  # caught where it arises, named before the losses it reached
            assert line.index("AVM logits S_av") < line.index("importance I_v") < line.index("RCA probabilities p_v")
            assert line.index("RCA probabilities p_a") < line.index("loss_mae_a")
        assert_nothing_blocks(tmp_path / method)
    # the same command with a sane learning rate starts in the same output.dir: the failed start is reused
    again = subprocess.run(train_cmd(data_root, tmp_path / "stella"), capture_output=True, text=True, env=ENV,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"reusing {tmp_path / 'stella'}: an earlier start stopped before its first checkpoint" in again.stdout
    assert "after task1: A->V" in again.stdout and "after task2: A->V" in again.stdout  # --quiet keeps these
    assert (tmp_path / "stella" / "checkpoints" / "task02_task2.pt").is_file()


def test_bad_values_fail_before_the_first_step_and_leave_nothing(tmp_path, data_root):
    few = tmp_path / "few"  # task2 keeps 2 training clips: fewer than one batch of 4
    shutil.copytree(data_root, few)
    lines = (few / "train.csv").read_text().splitlines()
    task = lines[0].split(",").index("task")
    kept = [line for line in lines[1:] if line.split(",")[task] == "task1"]
    kept += [line for line in lines[1:] if line.split(",")[task] == "task2"][:2]
    (few / "train.csv").write_text("\n".join([lines[0], *kept]) + "\n")
    out = tmp_path / "run"
    cases = [
        (train_cmd(data_root, out, "train.batch_size=0"), "train.batch_size: 0 must be at least 1"),
        (train_cmd(data_root, out, "train.epochs=-1"), "train.epochs: -1 must be at least 1"),
        (train_cmd(data_root, out, "model.mask_ratio_v=1.5"), "model.mask_ratio_v: 1.5 must be in [0, 1)"),
        (train_cmd(data_root, out, "method.stella.core_video_ratio=-0.1"), "method.stella.core_video_ratio"),
        (train_cmd(data_root, out, "optim.lr=0"), "optim.lr: 0.0 must be a finite number > 0"),
        (train_cmd(data_root, out, "method.memory_size=0"), "method.memory_size: 0 must be at least 1 for stella"),
        (train_cmd(data_root, out, "method.name=stela"), "method.name: 'stela' is not one of multitask, finetune"),
        (train_cmd(few, out), f"task 'task2': 2 training clips in {few / 'train.csv'}, fewer than one batch "
                              f"(train.batch_size=4)"),
        (train_cmd(data_root, out, f"model.checkpoint={tmp_path / 'missing.pth'}"),
         f"model.checkpoint: {tmp_path / 'missing.pth'} not found; pass --set model.checkpoint=PATH"),
    ]
    if not torch.cuda.is_available():
        cases.append((train_cmd(data_root, out, "train.device=cuda"), "train.device=cuda: no CUDA device"))
    for (cmd, message), result in zip(cases, run_all([c for c, _ in cases])):
        assert_one_line(result, 2, message)
        assert_nothing_blocks(out)
    good = subprocess.run(train_cmd(data_root, out, "eval.retrieval=false"), capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert good.returncode == 0, good.stdout + good.stderr


def test_kill_before_the_first_checkpoint_then_the_same_command(tmp_path, data_root):
    """kill -9 during task 1, before any checkpoint (the default is every 10 minutes): the folder holds no run, so
    the same command reuses it, and so does the same command with --resume."""
    out = tmp_path / "run"
    cmd = train_cmd(data_root, out, "train.log_every=1", "eval.retrieval=false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    if list((out / "checkpoints").glob("*.pt")):
        pytest.skip("the machine was too slow to kill the run before the end of task 1")
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "reusing" in resumed.stdout and "before its first checkpoint" in resumed.stdout


def test_a_second_start_in_a_held_run_directory_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, data_root):
    """Two real processes: while a run trains, the same command (and its --resume) is refused in one line naming
    the holder; after kill -9 of the holder the OS has released the lock, and --resume continues at once."""
    out = tmp_path / "run"
    cmd = train_cmd(data_root, out, "train.epochs=1000", "train.checkpoint_every=1")
    holder = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    latest, deadline = out / "checkpoints" / "latest.pt", time.time() + 120
    while not latest.is_file() and holder.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert latest.is_file(), holder.communicate()[0][-3000:] if holder.poll() is not None else "no checkpoint"
    for result in run_all([cmd, cmd + ["--resume"]]):
        assert_one_line(result, 2, f"{out} is in use by another stella process (pid {holder.pid} on host "
                                   f"{socket.gethostname()} since ", " s ago: stella train ",
                        f"); wait for it to end or stop it (then continue with --resume), or choose another "
                        f"output.dir (e.g. --set output.dir={out}_2)")
    holder.kill()
    holder.communicate(timeout=60)
    step = torch.load(latest, map_location="cpu", weights_only=False)["position"]["step"]
    resumed = subprocess.run(train_cmd(data_root, out, resume=True) + ["--stop-after", str(step + 1)],
                             capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 130, resumed.stdout + resumed.stderr
    assert f"resumed {out} at step {step}" in resumed.stdout and f"stopped at step {step + 1}" in resumed.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="data-loader and prep workers are forked on Linux only")
def test_a_forked_worker_does_not_keep_its_parents_lock(tmp_path):
    """A data-loader or prep worker is a fork of the process that holds the lock: once that process lets go (or is
    killed), the lock is free even while the worker still runs, so --resume never waits for a worker to notice."""
    held = lock(tmp_path, "advice")
    read, write = os.pipe()
    started, ready = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: says it runs, then lives on until the parent writes
        os.write(ready, b"r")
        os.read(read, 1)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"r"
        unlock(held)
        unlock(lock(tmp_path, "advice"))  # a FolderInUse here if the worker had kept its copy of the lock
    finally:
        os.write(write, b"x")
        os.waitpid(pid, 0)
        for fd in (read, write, started, ready):
            os.close(fd)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    recipe = load_recipe(ROOT / "recipes" / "synthetic.yaml",
                         [o for o in tiny(data_root, tmp / "run", "eval.retrieval=false") if o != "--set"])
    return run(recipe, quiet=True)


def damage(run_dir: Path, how: str, tmp_path: Path) -> Path:
    """A copy of the run whose latest.pt is damaged `how` (a new file: the task checkpoints stay good)."""
    copy = tmp_path / how
    shutil.copytree(run_dir, copy)
    latest = copy / "checkpoints" / "latest.pt"
    good = latest.read_bytes()
    latest.unlink()
    if how == "truncated":
        latest.write_bytes(good[: len(good) // 2])
    elif how == "empty":
        latest.write_bytes(b"")
    elif how == "foreign":
        torch.save({"model": {}}, latest)
    else:  # another method, or another model shape, than the run's config.yaml
        state = torch.load(copy / "checkpoints" / "task02_task2.pt", map_location="cpu", weights_only=False)
        if how == "method":
            state["recipe"]["method"]["name"] = "stella+"
        else:
            state["model"]["pos_embed_a"] = torch.zeros(1, 3, 5)
        torch.save(state, latest)
    return copy


def test_damaged_checkpoints_are_one_line_and_say_what_to_do(tmp_path, data_root, finished_run):
    hows = ["truncated", "empty", "foreign", "method", "shape"]
    copies = {how: damage(finished_run, how, tmp_path) for how in hows}
    messages = {"truncated": "cannot be read", "empty": "empty file (0 bytes), not a checkpoint",
                "foreign": "not a `stella train` checkpoint (no method, method_extra",
                "method": "saved by method 'stella+', but the recipe trains 'stella'",
                "shape": "another model shape than the recipe's (backbone.pos_embed_a: saved (1, 3, 5)"}
    cmds = [train_cmd(data_root, copies[h], resume=True) for h in hows]
    cmds += [cli("buffer", str(copies[h])) for h in ("truncated", "empty")]
    # `stella eval` reads a checkpoint file the same way, so it says the same
    cmds += [cli("eval", str(copies[h] / "checkpoints" / "latest.pt"), "--task", "retrieval")
             for h in ("truncated", "empty")]
    results = run_all(cmds)
    for how, result in zip(hows + ["truncated", "empty"] * 2, results):
        latest = copies[how] / "checkpoints" / "latest.pt"
        line = assert_one_line(result, 2, f"{latest}: ", messages[how])
        if how in ("truncated", "empty"):
            assert f"cp {copies[how] / 'checkpoints' / 'task02_task2.pt'} {latest}" in line
    # what the message says to do works
    shutil.copyfile(copies["truncated"] / "checkpoints" / "task02_task2.pt",
                    copies["truncated"] / "checkpoints" / "latest.pt")
    fixed = subprocess.run(cli("buffer", str(copies["truncated"])), capture_output=True, text=True, env=ENV,
                           timeout=300)
    assert fixed.returncode == 0 and "12 / 12 slots filled" in fixed.stdout, fixed.stdout + fixed.stderr


# ----------------------------------------------------------------------------------------------------------
# a full disk


@dataclass
class SmallDisk:
    """A folder on which only so many more bytes fit: a tmpfs of its own where this process may mount one (root on
    Linux: a real full disk, ENOSPC), else `ulimit -f` on the command that writes (RLIMIT_FSIZE: no file may grow
    past that many bytes, EFBIG). Both reach the same code: an OSError while a file is written."""

    folder: Path
    tmpfs: bool

    @property
    def reason(self) -> str:
        return "no space left on device" if self.tmpfs else "file too large"

    def leave(self, free: int) -> dict[str, Any]:
        """Let only `free` more bytes fit; returns the keyword arguments of the subprocess that meets it."""
        if not self.tmpfs:
            return {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (free, free))}
        self.make_room()
        stat = os.statvfs(self.folder)
        with open(self.folder / "filler", "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, stat.f_bavail * stat.f_frsize - free)
        return {}

    def make_room(self) -> None:
        (self.folder / "filler").unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path) -> SmallDisk:
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = sys.platform.startswith("linux") and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    yield SmallDisk(folder, mounted)
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_names_the_file_keeps_the_last_good_version_and_the_same_command_continues(small_disk, data_root):
    """A checkpoint, a figure and a feature cache written to a full disk: one line naming the file, the free space
    and how to continue, the partial file removed, the last good checkpoint untouched; with room, --resume ends."""
    run_dir = small_disk.folder / "run"
    recipe = load_recipe(ROOT / "recipes" / "synthetic.yaml", [o for o in tiny(data_root, run_dir) if o != "--set"])
    with pytest.raises(TrainingInterrupted):
        run(recipe, quiet=True, stop_after=2)  # latest.pt at step 2, the last good checkpoint
    latest = run_dir / "checkpoints" / "latest.pt"
    good = latest.read_bytes()
    full = subprocess.run(train_cmd(data_root, run_dir, resume=True), capture_output=True, text=True, env=ENV,
                          timeout=600, **small_disk.leave(len(good) // 2))  # the task-1 checkpoint does not fit
    assert_one_line(full, 2, f"{run_dir / 'checkpoints' / 'task01_task1.pt'}: cannot write it ({small_disk.reason}",
                    " free on ", "; the partial file was removed; the last good checkpoint "
                    f"{latest} is untouched: make room and continue with `stella train ", " --resume`")
    assert latest.read_bytes() == good
    assert [p.name for p in latest.parent.iterdir()] == ["latest.pt"]  # no task01_task1.pt.tmp left behind
    small_disk.make_room()
    again = subprocess.run(full.args, capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed {run_dir} at step 2" in again.stdout and "after task2: A->V" in again.stdout

    reports = small_disk.folder / "reports"  # the tables fit, the first figure does not
    report = subprocess.run(cli("report", str(run_dir), "--out", str(reports)), capture_output=True, text=True,
                            env=ENV, timeout=300, **small_disk.leave(16 * 1024))
    assert_one_line(report, 2, f"{reports / 'retrieval_bars.png'}: cannot write it ({small_disk.reason}",
                    "the partial file was removed; make room (or fix the cause) and run the same command again")
    assert sorted(p.name for p in reports.iterdir()) == ["retrieval.csv", "retrieval.json", "retrieval.md"]

    data = small_disk.folder / "data"  # the synthetic benchmark's training fbank cache is 60 MiB
    prep = subprocess.run(cli("prep", "synthetic", "--out", str(data), "--no-heldout", "--workers", "1", "--quiet"),
                          capture_output=True, text=True, env=ENV, timeout=300, **small_disk.leave(10 * 2**20))
    fbank = data / "cache" / "train" / "fbank.npy"
    assert_one_line(prep, 2, f"{fbank}: cannot write it ({small_disk.reason}", ": it needs 60.0 MiB; ",
                    "the partial file was removed; make room")
    assert not fbank.exists() and (data / "cache" / "train" / "status.npy").is_file()


# ----------------------------------------------------------------------------------------------------------
# a damaged feature cache


def test_a_damaged_feature_cache_names_the_file_and_the_prep_that_rebuilds_it(tmp_path, data_root):
    """cache/train/fbank.npy cut short (a copy interrupted by a full disk) inside its 21st row: `stella train` names
    the file, its expected and actual size and the prep command, before it writes anything; `stella prep --check`
    finds it; the prep that made the folder keeps the 20 whole rows and prepares the other 12 again, bit for bit."""
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    fbank = data / "cache" / "train" / "fbank.npy"
    whole = fbank.read_bytes()
    row_bytes = 384 * 128 * 2  # float16 (32, 384, 128): 32 clips of 384 x 128
    header = len(whole) - 32 * row_bytes
    fbank.write_bytes(whole[: header + 20 * row_bytes + 1000])
    cut = fbank.stat().st_size
    out = tmp_path / "run"
    train, check = run_all([train_cmd(data, out), cli("prep", "--check", str(data))])
    assert_one_line(train, 2, f"{fbank}: damaged feature cache ({cut:,} bytes, expected {len(whole):,} (float16 "
                              "(32, 384, 128)): cut short, by a full disk or an interrupted copy?); rebuild it with "
                              f"`stella prep synthetic --no-heldout --out {data}`")
    assert not out.exists()
    assert_one_line(check, 2, f"{data}: 1 problem (above); `stella prep synthetic --no-heldout --out {data}` "
                              "rebuilds what is missing or damaged and keeps the rest")
    assert f"problem: {fbank}: {cut:,} bytes, expected {len(whole):,}" in check.stdout
    assert tiny_synthetic(data) and fbank.read_bytes() == whole  # the same prep (a config the CLI does not take)
    again = subprocess.run(cli("prep", "--check", str(data)), capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0 and "every cache file whole, every manifest row cached and done" in again.stdout


def test_a_prep_prepares_again_only_the_rows_a_damaged_file_lost(tmp_path):
    """The repair behind `stella prep`'s resume: a cut fbank.npy loses the rows past its last whole one, a cut JPEG
    file its own row, a cut status.npy every row; check_folder (`--check`) names each, and the prep redoes exactly
    those rows, ending bit-identical to an undamaged cache."""
    config = SynthConfig(num_classes=4, num_tasks=1, train_per_class=2, test_per_class=1, retrieval_per_class=1)
    good, data = tmp_path / "good", tmp_path / "data"
    for folder in (good, data):
        prepare_synthetic(folder, workers=1, frames_format="jpeg", config=config)
    train = data / "cache" / "train"
    fbank = train / "fbank.npy"
    fbank.write_bytes(fbank.read_bytes()[:-(3 * 384 * 128 * 2 + 10)])  # the last 4 of 8 rows lost (one in part)
    (train / "jpeg" / "1.bin").write_bytes(b"")
    (data / "cache" / "test" / "status.npy").write_bytes(b"\x93NUMPY")
    _, problems = check_folder(data)
    assert [p.split(": ")[0] for p in problems] == [str(fbank), str(data / "train.csv"),
                                                     str(data / "cache" / "test" / "status.npy")]
    assert "clips whose JPEG file in " in problems[1] and ": 1 (e.g. train_c00_001, row 1)" in problems[1]
    assert prepare_synthetic(data, workers=1, frames_format="jpeg", config=config)["generated"] == 4 + 1 + 4
    for path in sorted(good.rglob("*")):
        if path.is_file() and path.name != "prep_report.json":
            assert path.read_bytes() == (data / path.relative_to(good)).read_bytes(), path
    assert check_folder(data)[1] == []


# ----------------------------------------------------------------------------------------------------------
# prep


def test_prep_of_nothing_fails_and_leaves_nothing(tmp_path):
    from helpers import make_clip

    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    cmd = cli("prep", "vggsound", "--root", str(empty), "--categories", str(PREP_FIX / "vggsound_stat.csv"),
              "--out", str(out), "--quiet", "--workers", "1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert_one_line(result, 2, "stella prep vggsound: no training clip could be prepared (0 skipped)",
                    f"({out} removed)")
    assert not out.exists()
    clips = tmp_path / "clips"  # the same command on a folder that has clips
    for split, n in (("train", 1), ("test", 1)):
        for k in range(n):
            make_clip(clips / split / "dog_barking" / f"{split}{k}.mp4", seed=k)
    result = subprocess.run(cmd[:6] + [str(clips)] + cmd[7:], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "train.csv").read_text().count("\n") == 2  # header + 1 clip


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.is_file() else []


def is_alive(pid: int) -> bool:
    """Running or sleeping; a zombie (exited, waiting to be reaped) is dead."""
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "zombie" not in state and "dead" not in state


def start_prep(out: Path) -> tuple[subprocess.Popen, list[int]]:
    """`stella prep synthetic` (the full benchmark: a minute of work) with 2 workers, once both have started."""
    # SIGINT at its default in the child: a test run started as a background job (`cmd &`) ignores SIGINT, and a
    # child Python then keeps ignoring it, so Ctrl-C would never reach `stella prep`
    proc = subprocess.Popen(cli("prep", "synthetic", "--out", str(out), "--workers", "2", "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(children(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) == 2, proc.communicate()[0] if proc.poll() is not None else "no workers"
    time.sleep(0.5)  # they are rendering
    return proc, workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_prep_killed_with_9_leaves_no_worker_behind(tmp_path):
    proc, workers = start_prep(tmp_path / "out")
    second = subprocess.run(cli("prep", "synthetic", "--out", str(tmp_path / "out"), "--quiet"), capture_output=True,
                            text=True, env=ENV, timeout=300)  # one prep at a time into one --out
    assert_one_line(second, 2, f"{tmp_path / 'out'} is in use by another stella process (pid {proc.pid} on host ",
                    "stella prep synthetic --out", "; wait for it to end or stop it (a prep continues where it "
                    "stopped), or choose another --out")
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 5
    while any(map(is_alive, workers)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(is_alive, workers)), workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_prep_ctrl_c_stops_at_once_and_says_how_to_continue(tmp_path):
    proc, workers = start_prep(tmp_path / "out")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert f"stella prep interrupted; the clips prepared so far are kept in {tmp_path / 'out'}: run the same " \
           "command again to continue" in out
    assert not any(map(is_alive, workers))


@pytest.mark.parametrize("override, message", [
    ("model.embed_dim=66", "model.embed_dim: 66 must be divisible by model.num_heads=4"),
    ("model.patch_size=24", "data.image_size: 64 must be a multiple of model.patch_size=24"),
    ("optim.betas=[0.9,1.0]", "optim.betas: [0.9, 1.0] must be two numbers in [0, 1)"),
    ("eval.recall_at=[]", "eval.recall_at: [] must be a non-empty list of K >= 1"),
    ("train.checkpoint_minutes=-1", "train.checkpoint_minutes: -1.0 must be >= 0"),
    ("method.stella.att_temperature=inf", "method.stella.att_temperature: inf must be a finite number > 0"),
])
def test_every_value_is_checked_when_the_recipe_is_loaded(override, message):
    """The same check as the CLI cases above, for the keys they do not run (config.check_values)."""
    from stella_cli.config import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes" / "synthetic.yaml", ["model.preset=tiny", override])
    assert str(err.value) == f"{ROOT / 'recipes' / 'synthetic.yaml'}: {message}"
    # the method's own checks (factory.check_method) run when training starts; `stella train` is covered above


# ----------------------------------------------------------------------------------------------------------
# a file whose pickle would run code (README "Security")


class CreatesFile:
    """Unpickled without weights_only, this runs `touch MARKER` (os.system): what a file from elsewhere can carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Add CreatesFile to a real checkpoint, beside its real contents, so every other check of the file passes."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["method_extra"]["note"] = CreatesFile(marker)
    torch.save(state, path)


def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(tmp_path, data_root, finished_run, monkeypatch):
    """`stella eval`, `buffer`, `train --resume`, `report`, `convert mae` and `model.checkpoint` on a run whose
    checkpoints would create a file when unpickled: each ends in one line with exit 2, and the file never appears,
    even with PyTorch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set."""
    run_dir, marker = tmp_path / "from_elsewhere", tmp_path / "MARKER"
    shutil.copytree(finished_run, run_dir)
    for path in (run_dir / "checkpoints").glob("*.pt"):
        plant(path, marker)
    single = tmp_path / "downloaded.pt"  # a lone file: its recipe would come from inside it
    shutil.copyfile(run_dir / "checkpoints" / "latest.pt", single)
    before = (run_dir / "checkpoints" / "latest.pt").read_bytes()
    live = tmp_path / "live.pt"  # the payload works: an unrestricted load runs it
    plant(shutil.copyfile(finished_run / "checkpoints" / "latest.pt", live), tmp_path / "LIVE")
    torch.load(live, weights_only=False)
    assert (tmp_path / "LIVE").is_file()

    monkeypatch.setitem(ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cases = {
        "eval run": (cli("eval", str(run_dir), "--task", "retrieval"), "task01_task1.pt"),
        "eval file": (cli("eval", str(single), "--task", "retrieval"), single.name),
        "buffer": (cli("buffer", str(run_dir), "--show", "2"), "latest.pt"),
        "resume": (train_cmd(data_root, run_dir, resume=True), "latest.pt"),
        "model.checkpoint": (train_cmd(data_root, tmp_path / "new", f"model.checkpoint={single}"), single.name),
        "convert mae": (cli("convert", "mae", str(single), str(tmp_path / "init.pth")), single.name),
        "report": (cli("report", str(run_dir), "--out", str(tmp_path / "reports")), None),
        "report file": (cli("report", str(single), "--table", "efficiency", "--out", str(tmp_path / "reports")), None),
    }
    results = dict(zip(cases, run_all([cmd for cmd, _ in cases.values()])))
    needs = f"loading it needs {os.system.__module__}.system, but stella reads only tensors, numbers, strings, lists"
    for name, (_, file) in cases.items():
        if file is not None:
            assert_one_line(results[name], 2, f"{file}: refused, nothing in it was run: {needs}")
    assert_one_line(results["report"], 2, "no finished run", "no results/summary.json yet")  # reads no checkpoint
    assert_one_line(results["report file"], 2, f"{single}: a binary file, not JSON")
    assert not marker.exists()
    assert (run_dir / "checkpoints" / "latest.pt").read_bytes() == before  # the refused resume wrote nothing
    assert not (tmp_path / "init.pth").exists() and not (run_dir / "plots").exists()
    assert not (run_dir / "results" / "retrieval.json").exists() and not (tmp_path / "eval_downloaded").exists()
    assert_nothing_blocks(tmp_path / "new")


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
def test_the_reader_refuses_code_in_every_file_format(tmp_path, how):
    """torch.save's zip format, its legacy format, and a plain pickle (protocol 4, which torch.save never writes):
    refused without running the payload, naming what it needs where torch can tell; the same files without the
    payload load."""
    from stella_cli.checkpoint import read_checkpoint, read_torch_file
    from stella_cli.errors import CheckpointError

    marker, path, good = tmp_path / "MARKER", tmp_path / "file.pt", tmp_path / "good.pt"
    for state, out in (({"w": torch.ones(2), "note": CreatesFile(marker)}, path), ({"w": torch.ones(2)}, good)):
        if how == "pickle":
            out.write_bytes(pickle.dumps(state, protocol=4))
        else:
            torch.save(state, out, _use_new_zipfile_serialization=how == "zip")
    if how == "pickle":  # not a torch file: the caller says it cannot be read
        with pytest.raises(pickle.UnpicklingError, match="not a torch.save file of tensors, numbers"):
            read_torch_file(path)
        with pytest.raises(CheckpointError, match="cannot be read .* not a torch.save file"):
            read_checkpoint(path)
    else:
        with pytest.raises(CheckpointError, match=f"{path}: refused, nothing in it was run: loading it needs "
                                                  f"{os.system.__module__}.system, but"):
            read_torch_file(path)
        assert torch.equal(read_torch_file(good)["w"], torch.ones(2))
    assert not marker.exists()
