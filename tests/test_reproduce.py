"""`stella reproduce`: the runs of a table, skip finished runs, resume interrupted ones, then the report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_same_weights, final_weights, retrieval_rows, tiny_synthetic

from stella_cli.config import load_recipe, recipe_to_yaml
from stella_cli.reproduce import PAPER_RECIPES, TABLES, chance_line, select_names

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}  # rich wraps at 80 columns off a terminal


def stella(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stella_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Tiny synthetic data and a recipes folder whose synthetic_<method>.yaml and initialisation chain extend the
    real ones: the chain trains on the data's task2 into data/init, and the table's recipes start from it."""
    tmp = tmp_path_factory.mktemp("reproduce")
    data, init = tmp / "data", tmp / "data" / "init"
    tiny_synthetic(data)
    (tmp / "recipes").mkdir()
    start = {name: init / name / "checkpoints" / "latest.pt" for name in ("backbone", "avm")}
    for stem, name, checkpoint in (("init_synthetic_heldout", "backbone", ""),
                                   ("init_avm_synthetic", "avm", start["backbone"])):
        (tmp / "recipes" / f"{stem}.yaml").write_text(
            f"extends: {ROOT / 'recipes' / stem}.yaml\ndata: {{root: {data}, tasks: [task2], num_workers: 0}}\n"
            f"model: {{preset: tiny, checkpoint: '{checkpoint}'}}\ntrain: {{epochs: 1, batch_size: 4}}\n"
            f"output: {{dir: {init / name}}}\n")
    for method in ("finetune", "stella"):
        real = ROOT / "recipes" / f"synthetic_{method}.yaml"
        (tmp / "recipes" / f"synthetic_{method}.yaml").write_text(
            f"extends: {real}\ndata: {{root: {data}, num_workers: 0}}\n"
            f"model: {{preset: tiny, checkpoint: {start['backbone']}, avm: {{checkpoint: {start['avm']}}}}}\n"
            "method: {memory_size: 12}\ntrain: {epochs: 1, batch_size: 4}\n")
    return tmp


def test_every_table_names_its_recipes():
    for name, spec in TABLES.items():
        if spec.bench:
            continue
        for recipe in [f"{spec.prefix}_{method}" for method in spec.names] + list(spec.init):
            path = ROOT / "recipes" / f"{recipe}.yaml"
            assert path.is_file(), f"table {name} needs {path}"
    assert select_names(TABLES["synthetic"], "stella+,finetune") == ("finetune", "stella_plus")  # paper order
    assert TABLES["synthetic"].names == (*PAPER_RECIPES, "stella_random_avm") and len(PAPER_RECIPES) == 11
    assert TABLES["synthetic"].init == TABLES["synthetic-init"].init == ("init_synthetic_heldout", "init_avm_synthetic")
    assert TABLES["synthetic"].parallel and not TABLES["vggsound-retrieval"].parallel


def test_the_default_is_the_first_seed_of_the_full_table():
    """`make reproduce` runs seed 2021 at the recipes' own budget; --full runs the rest (its runs are skipped)."""
    from stella_cli.reproduce import parse_seeds

    assert parse_seeds(None, TABLES["synthetic"], full=False) == (2021,)
    assert parse_seeds(None, TABLES["synthetic"], full=True) == (2021, 2022, 2023, 2024, 2025)
    assert parse_seeds("7,8", TABLES["synthetic"], full=True) == (7, 8)
    assert load_recipe(ROOT / "recipes" / "synthetic_er.yaml").train.epochs == 10  # the paper's, per task
    assert load_recipe(ROOT / "recipes" / "synthetic_multitask.yaml").train.epochs == 20  # as many clips as ER


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown table 'nope'"),
    (["synthetic", "--methods", "bogus"], "--methods: bogus not in this table"),
    (["synthetic", "--seeds", "a,b"], "--seeds 'a,b': expected comma-separated integers"),
    (["synthetic", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["vggsound-retrieval", "--jobs", "2"], "--jobs: this table runs one run at a time"),
])
def test_bad_arguments_are_one_line(workspace, args, message):
    proc = stella("reproduce", *args, "--recipes", str(workspace / "recipes"), cwd=workspace)
    assert proc.returncode == 2 and message in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_skips_finished_runs_and_resumes_interrupted_ones(workspace):
    common = ["--recipes", str(workspace / "recipes"), "--runs", str(workspace / "runs"), "--set", "train.epochs=1"]
    first = stella("reproduce", "synthetic", "--methods", "finetune", "--seeds", "1", *common, cwd=workspace)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    finetune = workspace / "runs" / "synthetic" / "synthetic_finetune_s1"
    assert json.loads((finetune / "reproduce.json").read_text())["seed"] == 1
    assert "chance with a gallery of 12 clips: R@1 8.3, R@5 41.7, R@10 83.3" in first.stdout
    assert re.search(r"\[\d/3\] synthetic_finetune_s1: finished", first.stdout)  # the chain's 2 runs, then it
    assert "after task2: A->V" in (workspace / "runs" / "synthetic" / "logs" / "synthetic_finetune_s1.log").read_text()
    init = workspace / "data" / "init"
    assert (init / "avm" / "reproduce.json").is_file() and set(json.loads((init / "chain.json").read_text())) == \
        {"backbone", "avm"}  # the chain was made first (test_init_chain.py: reuse and remaking)
    started = load_recipe(finetune / "config.yaml").model.checkpoint
    assert started == str(init / "backbone" / "checkpoints" / "latest.pt")

    # an interrupted STELLA run where reproduce will look for it
    stella_dir = workspace / "runs" / "synthetic" / "synthetic_stella_s1"
    stopped = stella("train", str(workspace / "recipes" / "synthetic_stella.yaml"), "--set", f"output.dir={stella_dir}",
                     "--set", "train.seed=1", "--set", "train.epochs=1", "--stop-after", "2", "--quiet", cwd=workspace)
    assert stopped.returncode == 130 and not (stella_dir / "reproduce.json").exists()

    second = stella("reproduce", "synthetic", "--methods", "finetune,stella", "--seeds", "1", *common, cwd=workspace)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "synthetic_finetune_s1: finished before" in second.stdout and "synthetic_stella_s1: resumed" in second.stdout
    assert "init chain: reusing" in second.stdout
    log = (workspace / "runs" / "synthetic" / "logs" / "synthetic_stella_s1.log").read_text()
    assert f"resumed {stella_dir} at step 2" in " ".join(log.split())  # rich may wrap the long path
    rows = json.loads((stella_dir / "results" / "retrieval.json").read_text())["rows"]
    assert [r["after_task"] for r in rows] == ["task1", "task2"]
    assert (workspace / "runs" / "synthetic" / "report").is_dir()


def test_chance_line_counts_the_gallery(workspace, tmp_path):
    recipe = load_recipe(workspace / "recipes" / "synthetic_finetune.yaml", [f"output.dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(recipe_to_yaml(recipe))
    assert chance_line(tmp_path) == "chance with a gallery of 12 clips: R@1 8.3, R@5 41.7, R@10 83.3, avg 44.44"


def test_a_failing_run_stops_with_its_exit_code_and_one_line(workspace, tmp_path):
    proc = stella("reproduce", "synthetic", "--methods", "finetune", "--seeds", "3", "--recipes",
                  str(workspace / "recipes"), "--runs", str(tmp_path), "--set", f"model.checkpoint={tmp_path / 'no.pt'}",
                  cwd=workspace)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no.pt: checkpoint not found" in proc.stdout  # the run's own error line, from its log
    assert "synthetic_finetune.yaml (seed 3) failed with exit code 2" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "synthetic" / "synthetic_finetune_s3" / "reproduce.json").exists()


def test_a_bad_value_stops_before_any_run(workspace, tmp_path):
    proc = stella("reproduce", "synthetic", "--methods", "finetune", "--seeds", "3", "--recipes",
                  str(workspace / "recipes"), "--runs", str(tmp_path), "--set", "train.batch_size=0", cwd=workspace)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"error: {workspace / 'recipes' / 'synthetic_finetune.yaml'}: train.batch_size: 0 must be at "
                     "least 1"]
    assert not (tmp_path / "synthetic").exists()


def test_runs_side_by_side_equal_a_run_alone(workspace, tmp_path):
    """Two runs at once (one thread each) give the weights and results of the same run trained alone, bit for bit."""
    both = stella("reproduce", "synthetic", "--methods", "finetune,stella", "--seeds", "7", "--jobs", "2",
                  "--recipes", str(workspace / "recipes"), "--runs", str(tmp_path), cwd=workspace)
    assert both.returncode == 0, both.stdout[-3000:] + both.stderr[-3000:]
    assert "4 runs, 2 at a time with one thread each" in both.stdout  # the chain's two (reused), the table's two
    alone = stella("train", str(workspace / "recipes" / "synthetic_stella.yaml"), "--set", "train.seed=7", "--set",
                   f"output.dir={tmp_path / 'alone'}", "--quiet", cwd=workspace)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    parallel = tmp_path / "synthetic" / "synthetic_stella_s7"
    assert_same_weights(final_weights(parallel), final_weights(tmp_path / "alone"))
    assert retrieval_rows(parallel) == retrieval_rows(tmp_path / "alone")
