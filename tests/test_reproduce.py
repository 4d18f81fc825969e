"""`stella reproduce`: the runs of a table, skip finished runs, resume interrupted ones, then the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tiny_synthetic

from stella_cli.config import load_recipe, recipe_to_yaml
from stella_cli.reproduce import MARKER, PAPER_RECIPES, TABLES, chance_line, scaled_epochs, select_names

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}  # rich wraps at 80 columns off a terminal


def stella(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stella_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Tiny synthetic data and a recipes folder whose synthetic_<method>.yaml extend the real ones."""
    tmp = tmp_path_factory.mktemp("reproduce")
    tiny_synthetic(tmp / "data")
    (tmp / "recipes").mkdir()
    for method in ("finetune", "stella"):
        real = ROOT / "recipes" / ("synthetic.yaml" if method == "stella" else f"synthetic_{method}.yaml")
        (tmp / "recipes" / f"synthetic_{method}.yaml").write_text(
            f"extends: {real}\ndata: {{root: {tmp / 'data'}, num_workers: 0}}\nmodel: {{preset: tiny}}\n"
            "method: {memory_size: 12}\ntrain: {epochs: 1, batch_size: 4}\n")
    return tmp


def test_every_table_names_its_recipes():
    for name, spec in TABLES.items():
        if spec.bench:
            continue
        for method in spec.names:
            path = ROOT / "recipes" / f"{spec.prefix}_{method}.yaml"
            assert path.is_file(), f"table {name} needs {path}"
    assert select_names(TABLES["synthetic"], "stella+,finetune") == ("finetune", "stella_plus")  # paper order
    assert TABLES["synthetic"].names == PAPER_RECIPES and len(PAPER_RECIPES) == 11


def test_paper_tables_start_pretrained_in_fp16_with_one_memory_size():
    """Every recipe of a paper table names its pre-trained start and uses the authors' fp16 autocast + GradScaler and
    12 AVM heads; every replay method of one table has one memory size (the authors' result scripts read a whole
    table from one buffer size): 2000 on VGGSound, 5000 on AudioSet (not 6000 for DER++ and CLS-ER)."""
    for table, memory in (("vggsound-retrieval", 2000), ("audioset-retrieval", 5000), ("ablation", 2000)):
        spec = TABLES[table]
        recipes = {n: load_recipe(ROOT / "recipes" / f"{spec.prefix}_{n}.yaml") for n in spec.names}
        assert all(r.optim.amp == "fp16" and r.model.avm.num_heads == 12 and r.model.checkpoint
                   and r.model.checkpoint_made_by for r in recipes.values())
        replay = {r.method.memory_size for n, r in recipes.items() if n not in ("finetune", "multitask")}
        assert replay == {memory}, table


def test_a_paper_table_stops_before_its_first_run_without_the_initial_checkpoint(tmp_path):
    """No run starts (nothing is written) and the one line says what to pass."""
    result = stella("reproduce", "vggsound-retrieval", "--methods", "er,stella", "--recipes", str(ROOT / "recipes"),
                    cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and len(out.strip().splitlines()) == 1 and "Traceback" not in out, out
    assert f"{ROOT / 'recipes' / 'vggsound_er.yaml'}: model.checkpoint: runs/init_audioset20k/checkpoints/" \
           "task01_all.pt not found (made by `stella train recipes/init_audioset20k.yaml`" in out
    assert "pass --set model.checkpoint=PATH, or --set model.checkpoint=random" in out
    assert list(tmp_path.iterdir()) == []


def test_the_laptop_budget_halves_each_recipes_epochs():
    """10 epochs per task, and 20 over the union for Multitask, which trains on as many clips as a replay method."""
    recipes = ROOT / "recipes"
    assert scaled_epochs(recipes / "synthetic_er.yaml", TABLES["synthetic"].epochs_fraction) == ["train.epochs=10"]
    assert scaled_epochs(recipes / "synthetic_multitask.yaml", 0.5) == ["train.epochs=20"]
    assert scaled_epochs(recipes / "synthetic_ablation_random.yaml", 0.5) == ["train.epochs=10"]
    assert scaled_epochs(recipes / "synthetic_er.yaml", 1.0) == []  # --full and the paper's tables: the recipes'
    assert TABLES["vggsound-retrieval"].epochs_fraction == 1.0


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown table 'nope'"),
    (["synthetic", "--methods", "bogus"], "--methods: bogus not in this table"),
    (["synthetic", "--seeds", "a,b"], "--seeds 'a,b': expected comma-separated integers"),
])
def test_bad_arguments_are_one_line(workspace, args, message):
    proc = stella("reproduce", *args, "--recipes", str(workspace / "recipes"), cwd=workspace)
    assert proc.returncode == 2 and message in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_skips_finished_runs_and_resumes_interrupted_ones(workspace):
    common = ["--recipes", str(workspace / "recipes"), "--runs", str(workspace / "runs"), "--set", "train.epochs=1"]
    args = ["reproduce", "synthetic", "--methods", "finetune", "--seeds", "1", *common]
    running = subprocess.Popen([sys.executable, "-m", "stella_cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=workspace, env=ENV)
    lock, deadline = workspace / "runs" / "synthetic" / ".stella.lock", time.time() + 120
    while not (lock.is_file() and lock.stat().st_size) and running.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = stella(*args, cwd=workspace)  # the same reproduction again, while the first runs: refused
    assert second.returncode == 2 and "Traceback" not in second.stdout + second.stderr
    table = workspace / "runs" / "synthetic"
    assert f"error: {table} is in use by another stella process (pid {running.pid} " in second.stdout
    out, err = running.communicate(timeout=600)  # its own `stella train` child was not blocked by its lock
    first = subprocess.CompletedProcess(running.args, running.returncode, out, err)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    finetune = workspace / "runs" / "synthetic" / "synthetic_finetune_s1"
    assert json.loads((finetune / "reproduce.json").read_text())["seed"] == 1
    assert "chance with a gallery of 12 clips: R@1 8.3, R@5 41.7, R@10 83.3" in first.stdout

    # an interrupted STELLA run where reproduce will look for it
    stella_dir = workspace / "runs" / "synthetic" / "synthetic_stella_s1"
    stopped = stella("train", str(workspace / "recipes" / "synthetic_stella.yaml"), "--set", f"output.dir={stella_dir}",
                     "--set", "train.seed=1", "--set", "train.epochs=1", "--stop-after", "2", "--quiet", cwd=workspace)
    assert stopped.returncode == 130 and not (stella_dir / "reproduce.json").exists()

    second = stella("reproduce", "synthetic", "--methods", "finetune,stella", "--seeds", "1", *common, cwd=workspace)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed" in second.stdout and "skipped" in second.stdout
    assert f"resumed {stella_dir} at step 2" in second.stdout
    rows = json.loads((stella_dir / "results" / "retrieval.json").read_text())["rows"]
    assert [r["after_task"] for r in rows] == ["task1", "task2"]
    assert (workspace / "runs" / "synthetic" / "report").is_dir()


def test_chance_line_counts_the_gallery(workspace, tmp_path):
    recipe = load_recipe(workspace / "recipes" / "synthetic_finetune.yaml", [f"output.dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(recipe_to_yaml(recipe))
    assert chance_line(tmp_path) == "chance with a gallery of 12 clips: R@1 8.3, R@5 41.7, R@10 83.3, avg 44.44"


def test_a_failing_run_stops_with_its_exit_code_and_one_line(workspace, tmp_path):
    """A run that fails when it starts (a task the data does not have): its exit code, its one line."""
    proc = stella("reproduce", "synthetic", "--methods", "finetune", "--seeds", "3", "--recipes",
                  str(workspace / "recipes"), "--runs", str(tmp_path), "--set", "data.tasks=[nope]", cwd=workspace)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nope" in proc.stdout and "failed with exit code 2" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "synthetic" / "synthetic_finetune_s3" / "reproduce.json").exists()


def test_sigterm_to_reproduce_alone_stops_the_run_with_a_checkpoint(workspace, tmp_path):
    """`docker stop` and schedulers signal PID 1 only, here `stella reproduce`: it passes SIGTERM on to its run,
    which saves a checkpoint at the next step and exits 130 (the same command resumes it: the test above)."""
    cmd = [sys.executable, "-m", "stella_cli", "reproduce", "synthetic", "--methods", "finetune", "--seeds", "5",
           "--recipes", str(workspace / "recipes"), "--runs", str(tmp_path), "--set", "train.log_every=1", "--set",
           "train.epochs=50"]
    run_dir = tmp_path / "synthetic" / "synthetic_finetune_s5"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workspace, env=ENV)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the parent only, not its process group
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert f"stella reproduce interrupted in {run_dir} (checkpoint kept)" in out and "Traceback" not in out
    assert (run_dir / "checkpoints" / "latest.pt").is_file() and not (run_dir / MARKER).exists()
