"""`stella eval`: targets (run, checkpoint file, authors' weights, latest run), every task's result files, seeds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import RANDOM_START, tiny_synthetic

from stella_cli import eval_run
from stella_cli.checkpoint import latest_run
from stella_cli.errors import StellaError
from stella_cli.train import run

ROOT = Path(__file__).resolve().parents[1]
FAST_HEADS = ["eval.classification.epochs=3", "eval.classification.timem=24", "eval.classification.lr=5e-3",
              "eval.ave.epochs=3", "eval.ave.lr=5e-3", "eval.avs.epochs=3", "eval.avs.lr=5e-3", "eval.avs.channels=8",
              "eval.avs.select_epoch=best_test",
              "eval.msrvtt.epochs=1", "eval.msrvtt.tasks=[task2]"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """4 classes in 2 tasks, 8 train clips per class."""
    out = tmp_path_factory.mktemp("synth")
    tiny_synthetic(out, test_per_class=2)
    return out


@pytest.fixture(scope="module")
def stella_run(tmp_path_factory, data_root) -> Path:
    from stella_cli.config import load_recipe

    tmp = tmp_path_factory.mktemp("stella")
    overrides = [f"data.root={data_root}", "data.num_workers=0", "model.preset=tiny", "method.memory_size=12",
                 "train.epochs=1", "train.batch_size=4", f"output.dir={tmp / 'run'}", *RANDOM_START,
                 # from random weights, 8 steps at the recipe's contrastive weight 0.1 leave features no head separates
                 # in 3 epochs; the weight the random start used to need (3.0) leaves some
                 "model.contrast_weight=3.0", "model.mask_ratio_a=0.75", "model.mask_ratio_v=0.75"]
    return run(load_recipe(ROOT / "recipes" / "synthetic.yaml", overrides), quiet=True)


def test_eval_all_writes_every_result_file(stella_run, data_root):
    heads = FAST_HEADS + [f"eval.msrvtt.root={data_root}"]  # the tiny benchmark's task2 stands in for a new domain
    out = eval_run.run([stella_run], task="all", overrides=heads, command="stella eval test", quiet=True)
    assert list(out) == ["retrieval", "classification", "localisation", "ave", "avs", "msrvtt"]
    for task in out:
        result = json.loads((stella_run / "results" / f"{task}.json").read_text())
        assert result["task"] == task and result["command"] == "stella eval test"
        assert result["checkpoint"].endswith("task02_task2.pt") and result["recipe"] == str(stella_run / "config.yaml")
        assert result["metrics"] and all(isinstance(v, (int, float)) for v in result["metrics"].values())
        assert (stella_run / "results" / f"{task}.md").read_text().startswith("| ")
        assert len((stella_run / "results" / f"{task}.csv").read_text().splitlines()) >= 2
    # retrieval: the accuracy matrix of both task checkpoints, the same R@K as the loop recorded
    retrieval = out["retrieval"][0]
    assert [r["after_task"] for r in retrieval["rows"]] == ["task1", "task2"]
    saved = torch.load(stella_run / "checkpoints" / "latest.pt", weights_only=False)["position"]["history"]
    for mine, loop in zip(retrieval["rows"], saved):
        for d in ("a2v", "v2a"):
            assert {k: v["R@1"] for k, v in mine["scores"][d].items()} == pytest.approx(
                {k: v["R@1"] for k, v in loop["scores"][d].items()})
        assert mine["modality_gap"] == pytest.approx(loop["modality_gap"], abs=1e-6)  # the gap of that checkpoint
    assert "a2v R@1 F" in retrieval["metrics"] and "v2a avg F_as_coded" in retrieval["metrics"]
    # the heads trained: their loss fell
    for task in ("classification", "ave", "avs"):
        losses = out[task][0]["loss_per_epoch"]
        assert len(losses) == 3 and losses[-1] < losses[0], (task, losses)
    # which epoch each head was tested after (the head learning is tested on separable features in
    # test_downstream.py: a tiny random backbone's features of 4 classes need not be)
    cls = out["classification"][0]
    assert cls["videos"] == 8 and set(cls["per_task"]) == {"task1", "task2"} and cls["chance_top1"] == 25.0
    assert cls["select_epoch"] == "last" and cls["tested_epoch"] == 3
    ave = out["ave"][0]
    assert ave["segments_per_video"] == 4 and ave["videos"] == 8 and ave["audio_starts"] == "authors"
    assert ave["audio_start_seconds"] == pytest.approx([0, 15466 / 16000, 30933 / 16000, 2.9])
    avs = out["avs"][0]  # best_test: scored after epochs 2 and 3 (eval_every 2, and the last)
    assert avs["clips"] == 8 and avs["frames"] == 32 and sorted(avs["test_score_per_epoch"]) == [2, 3]
    assert avs["test_score_per_epoch"][avs["tested_epoch"]] == max(avs["test_score_per_epoch"].values())
    loc = out["localisation"][0]
    assert [r["after_task"] for r in loc["rows"]] == ["task1", "task2"]
    assert 0 < loc["metrics"]["uniform_v"] < 100 and 0 < loc["metrics"]["share_v"] < 100
    msrvtt = out["msrvtt"][0]
    assert msrvtt["tasks"] == ["task2"] and (Path(msrvtt["transfer_run"]) / "checkpoints" / "latest.pt").is_file()


def test_checkpoint_files_and_the_authors_format(stella_run, tmp_path):
    first = stella_run / "checkpoints" / "task01_task1.pt"
    target = eval_run.resolve_target(first, recipe=None, overrides=[], checkpoint=None)
    assert target.recipe_path == str(stella_run / "config.yaml") and target.results_dir == stella_run / "results"
    picked = eval_run.resolve_target(stella_run, recipe=None, overrides=[], checkpoint="task01")
    assert picked.final == first and picked.checkpoints == [first]
    # a copied checkpoint carries its recipe inside
    lone = tmp_path / "lone.pt"
    shutil.copy(first, lone)
    target = eval_run.resolve_target(lone, recipe=None, overrides=[], checkpoint=None)
    assert target.recipe_path.endswith("(embedded)") and target.results_dir == tmp_path / "eval_lone" / "results"
    ours = eval_run.run([lone], task="retrieval", quiet=True)["retrieval"][0]["rows"][0]["scores"]
    # the authors' key names (module.backbone.transformer.*) need a recipe
    state = torch.load(first, weights_only=False)["model"]
    authors = tmp_path / "authors.pth"
    torch.save({"model": {f"module.backbone.transformer.{k}": v for k, v in state.items()}}, authors)
    with pytest.raises(StellaError, match="give --recipe"):
        eval_run.resolve_target(authors, recipe=None, overrides=[], checkpoint=None)
    theirs = eval_run.run([authors], task="retrieval", recipe=stella_run / "config.yaml",
                          quiet=True)["retrieval"][0]["rows"][0]["scores"]
    assert theirs == ours


def test_latest_run_and_errors(stella_run, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    with pytest.raises(StellaError, match="no run with checkpoints"):
        latest_run(runs)
    (runs / "old").mkdir()
    (runs / "demo").symlink_to(stella_run)
    assert latest_run(runs) == runs / "demo"
    with pytest.raises(StellaError, match="--checkpoint task07: not in"):
        eval_run.resolve_target(stella_run, recipe=None, overrides=[], checkpoint="task07")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, message in ((["--task", "nope"], "--task 'nope': choose one of all, retrieval"),
                          ([str(tmp_path / "missing")], "no such run directory or checkpoint"),
                          ([str(stella_run), "--task", "avs", "--set", "eval.avs.select_epoch=best"],
                           "eval.avs.select_epoch: 'best' is not one of last, best_test")):
        result = subprocess.run([sys.executable, "-m", "stella_cli", "eval", *args], capture_output=True, text=True,
                                env=env, cwd=tmp_path)
        assert result.returncode == 2 and message in " ".join(result.stdout.split()), result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


def test_mean_and_std_over_seeds():
    results = [{"metrics": {"a": 1.0, "b": 4.0}}, {"metrics": {"a": 3.0, "b": 4.0}}, {"metrics": {"a": 5.0}}]
    s = eval_run.seed_summary(results)["per_metric"]
    assert s == {"a": {"mean": 3.0, "std": 2.0, "n": 3}}  # sample std of 1, 3, 5; b is not in every run
    assert eval_run.seed_summary(results[:1])["per_metric"]["a"]["std"] == 0.0


def test_runs_of_one_recipe_get_mean_and_std(stella_run, tmp_path):
    from stella_cli.config import RecipeError

    twin = tmp_path / "twin"
    shutil.copytree(stella_run, twin, ignore=shutil.ignore_patterns("results"))
    out = eval_run.run([stella_run, twin], task="retrieval", quiet=True)
    record = out["mean"][0]
    saved = json.loads((stella_run.parent / f"{stella_run.name}_seeds" / "results" / "retrieval.json").read_text())
    assert saved["metrics"] == record["metrics"] and len(saved["checkpoint"]) == 2
    one = out["retrieval"][0]["metrics"]
    assert record["per_metric"]["a2v R@1 A"] == {"mean": one["a2v R@1 A"], "std": 0.0, "n": 2}  # same weights
    text = (twin / "config.yaml").read_text().replace("epochs: 1", "epochs: 2")
    (twin / "config.yaml").write_text(text)
    with pytest.raises(RecipeError, match="differs from .* in more than train.seed and output.dir"):
        eval_run.run([stella_run, twin], task="retrieval", quiet=True)


def test_the_eval_command_through_the_cli(stella_run):
    from typer.testing import CliRunner

    from stella_cli.cli import app

    result = CliRunner().invoke(app, ["eval", str(stella_run), "--task", "retrieval", "--checkpoint", "task01",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((stella_run / "results" / "retrieval.json").read_text())
    assert saved["checkpoint"].endswith("task01_task1.pt") and [r["after_task"] for r in saved["rows"]] == ["task1"]


def test_localisation_before_the_stream_scores_the_start_point(stella_run):
    """A run that starts from a pre-trained backbone and AVM gets a `start` row: the importance of that pair before
    any step. Here the 'start point' is the run's own task-1 checkpoint, so the start row equals the task-1 row."""
    first = stella_run / "checkpoints" / "task01_task1.pt"
    out = eval_run.run([stella_run], task="localisation", quiet=True,
                       overrides=[f"model.checkpoint={first}", f"model.avm.checkpoint={first}"])
    loc = out["localisation"][0]
    assert [r["after_task"] for r in loc["rows"]] == ["start", "task1", "task2"]
    assert loc["rows"][0]["scores"] == loc["rows"][1]["scores"]
    assert loc["metrics"]["start lift_v"] == loc["rows"][1]["scores"]["all"]["lift_v"]
    assert loc["stream_mean"]["lift_v"] == pytest.approx(sum(r["scores"]["all"]["lift_v"] for r in loc["rows"][1:]) / 2)
    random_start = eval_run.run([stella_run], task="localisation", quiet=True)["localisation"][0]  # no start row
    assert [r["after_task"] for r in random_start["rows"]] == ["task1", "task2"]
