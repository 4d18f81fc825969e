"""`stella reproduce`: the runs of a table, skip finished runs, resume interrupted ones, then the report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_same_weights, cli_many, final_weights, retrieval_rows, tiny_synthetic

from stella_cli.config import load_recipe, recipe_to_yaml
from stella_cli.reproduce import (MARKER, PAPER_RECIPES, SYNTHETIC_MEMORY, TABLES, VGGSOUND_MEMORY, chain_needed,
                                  chance_line, select_names, task_orders, variants)

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


def test_the_default_is_the_first_seed_of_the_full_table():
    """`make reproduce` runs seed 2021 at the recipes' own budget; --full runs the rest (its runs are skipped)."""
    from stella_cli.reproduce import parse_seeds

    assert parse_seeds(None, TABLES["synthetic"], full=False) == (2021,)
    assert parse_seeds(None, TABLES["synthetic"], full=True) == (2021, 2022, 2023)
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


def test_bad_analysis_arguments_are_one_line_and_write_nothing(workspace, tmp_path):
    cases = [
        (["synthetic-memory", "--methods", "finetune"], "--methods: finetune not in this table; choose from er, mir"),
        (["synthetic", "--methods", "stella", "--values", "1"], "--values: this table varies no recipe key"),
        (["synthetic-memory", "--methods", "stella", "--orders", "2"], "--orders: only the task-order tables"),
        (["synthetic-task-order", "--methods", "stella", "--orders", "0"], "--orders 0: give at least 1"),
        (["synthetic-task-order", "--methods", "stella", "--orders", "3"], "--orders 3: 2 tasks have only 2 orders"),
        (["synthetic-memory", "--methods", "stella", "--values", "1.5"], "method.memory_size: expected int, got "
                                                                         "float"),
        (["synthetic-memory", "--methods", "stella", "--values", "4,0"], "method.memory_size: 0 must be at least 1 "
                                                                         "for stella"),
        (["synthetic-temperature", "--values", "0"], "method.stella.att_temperature: 0.0 must be a finite number > 0"),
        (["synthetic-memory", "--methods", "stella", "--set", "method.memory_size=3"], "this table varies "
                                                                                       "method.memory_size itself"),
        (["synthetic-task-order", "--methods", "stella", "--set", "data.tasks=[task1]"], "this table varies "
                                                                                         "data.tasks itself; choose "
                                                                                         "its values with --orders")]
    where = ["--recipes", str(workspace / "recipes"), "--runs", str(tmp_path / "runs")]
    for (code, output), (args, message) in zip(cli_many(*[["reproduce", *args, *where] for args, _ in cases],
                                                        cwd=workspace), cases):
        assert code == 2 and message in output and len(output.strip().splitlines()) == 1, (args, output)
    assert not (tmp_path / "runs").exists()


def test_the_analyses_vary_one_key_or_the_task_order():
    """Memory: the synthetic sizes are VGGSound's as fractions of the stream (2000 of 64,000 clips = 20 of 640);
    each variant is a run named by its value; task orders: the recipe's own, then seeded permutations."""
    assert SYNTHETIC_MEMORY == (5, 10, 20, 40) and VGGSOUND_MEMORY[2] / (8 * 20 * 400) == 20 / 640
    recipe = ROOT / "recipes" / "synthetic_stella.yaml"
    assert variants(TABLES["synthetic-memory"], recipe, ("5", "10"), 0, []) == [
        ("memory_size5", ["method.memory_size=5"]), ("memory_size10", ["method.memory_size=10"])]
    assert variants(TABLES["synthetic-temperature"], recipe, ("0.1",), 0, [])[0] == (
        "att_temperature0.1", ["method.stella.att_temperature=0.1"])
    assert variants(TABLES["synthetic"], recipe, (), 0, []) == [("", [])]
    vgg = variants(TABLES["vggsound-task-order"], ROOT / "recipes" / "vggsound_er.yaml", (), 2, [])
    assert vgg[0] == ("order1", ["data.tasks=[sports, music, vehicle, people, animals, home_nature, others_part1, "
                                 "others_part2]"])  # the recipe's order, then random.Random(2022)'s permutation
    assert vgg[1] == ("order2", ["data.tasks=[animals, people, others_part2, vehicle, sports, home_nature, music, "
                                 "others_part1]"])
    five = task_orders([f"task{k}" for k in range(1, 6)], 3)
    assert five == [["task1", "task2", "task3", "task4", "task5"], ["task5", "task3", "task2", "task4", "task1"],
                    ["task4", "task5", "task2", "task3", "task1"]]
    assert task_orders(["a", "b"], 2) == [["a", "b"], ["b", "a"]]  # a repeat is drawn again
    assert select_names(TABLES["synthetic-memory"], None) == ("er", "derpp", "stella", "stella_plus")
    assert len(select_names(TABLES["synthetic-memory"], None, full=True)) == 9  # STELLA, STELLA+, 7 baselines
    assert TABLES["synthetic-modality-gap"].runs_of == "synthetic"  # the gap is read from the table's runs


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


def test_an_analysis_end_to_end_task_order(workspace, tmp_path):
    """Finetune in both orders of the 2-task stream: one run per order, its order in its saved recipe, the report
    ranks it in each."""
    common = ["--recipes", str(workspace / "recipes"), "--runs", str(tmp_path), "--set", "train.epochs=1",
              "--seeds", "1", "--methods", "finetune"]
    proc = stella("reproduce", "synthetic-task-order", "--orders", "2", *common, cwd=workspace)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "synthetic-task-order"
    for j, order in ((1, ["task1", "task2"]), (2, ["task2", "task1"])):
        assert load_recipe(runs / f"synthetic_finetune_order{j}_s1" / "config.yaml").data.tasks == order
    saved = json.loads((runs / "report" / "task-order.json").read_text())
    assert saved["rows"][0]["row"] == "Finetune" and saved["rows"][0]["values"]["rank order 2"]["mean"] == 1.0
    assert "order 2: task2 -> task1" in saved["notes"] and (runs / "report" / "task-order.png").is_file()


def test_the_chain_is_made_only_as_far_as_a_run_starts_from_it():
    """A run loading the AVM needs both steps, one loading the backbone alone the first, a random start none."""
    steps = [ROOT / "recipes" / f"{stem}.yaml" for stem in TABLES["synthetic"].init]
    model = {sets: load_recipe(ROOT / "recipes" / "synthetic_er.yaml", list(sets)).model for sets in (
        (), ("model.avm.checkpoint=",), ("model.checkpoint=random", "model.avm.checkpoint="))}
    assert chain_needed(steps, list(model.values())) == steps
    assert chain_needed(steps, [model[("model.avm.checkpoint=",)]]) == steps[:1]
    assert chain_needed(steps, [model[("model.checkpoint=random", "model.avm.checkpoint=")]]) == []
