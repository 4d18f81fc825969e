"""`stella report --table memory | task-order | modality-gap | temperature` (analysis.py) on hand-made runs, with
numbers worked out by hand, through the function and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import assert_png, cli_many

from stella_cli import analysis, report
from stella_cli.evaluate import write_results

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "250"}  # rich: no wrapping
MIB = 2 ** 20


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stella_cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT)


def matrix(a: float, f: float, tasks: int = 2) -> list[list[float]]:
    """a[l][k] of a 2-task run with A = a and conventional F = f: [[a + f, 0], [a, a]] (every R@K equal)."""
    return [[a + f, 0.0], [a, a]] if tasks == 2 else [[a, a]]


def make_run(root: Path, name: str, method: str, seed: int, a: float, f: float, *, tasks=("t1", "t2"),
             gaps: list[tuple[float, float, float]] | None = None, bytes_per_clip: int | None = None,
             **method_keys) -> Path:
    """A run directory as `stella train` leaves it: config.yaml (data.tasks = the order learnt) and results written
    by evaluate.write_results. A->V has A = a, F = f; V->A has A = a + 2, F = f + 1, so the figures' mean over the
    two directions is A = a + 1, F = f + 0.5. gaps: (gap, spread_a, spread_v) after each task; bytes_per_clip: the
    `memory` of each row."""
    run = root / name
    config = {"data": {"dataset": "synthetic", "root": "data/synthetic", "tasks": list(tasks)},
              "model": {"preset": "tiny"}, "method": {"name": method, "memory_size": 200, **method_keys},
              "train": {"seed": seed}, "output": {"dir": str(run)}}
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    union = method == "multitask"
    trained = ["all"] if union else list(tasks)
    mats = {"a2v": matrix(a, f, 1 if union else 2), "v2a": matrix(a + 2, f + 1, 1 if union else 2)}
    history = []
    for l, after in enumerate(trained):
        row = {"after_task": after, "step": l, "scores": {d: {"all": {}, **{t: {f"R@{k}": m[l][i] for k in (1, 5, 10)}
                                                                            for i, t in enumerate(tasks)}}
                                                          for d, m in mats.items()}}
        if gaps is not None:
            row["modality_gap"] = dict(zip(("gap", "spread_a", "spread_v"), gaps[l]))
        if bytes_per_clip is not None:
            row["memory"] = {"slots": config["method"]["memory_size"], "bytes_per_clip": bytes_per_clip,
                             "filled_rank0": config["method"]["memory_size"], "world_size": 1}
        history.append(row)
    write_results(run / "results", history, list(tasks), [1, 5, 10])
    return run


def cell(table: report.Table, label: str, column: str) -> tuple[float, float | None, int] | None:
    return table.stat([g.label for g in table.groups].index(label), column)


def best(table: report.Table, column: str) -> list[str]:
    return sorted(table.groups[i].label for i in table.best.get(column, ()))


# ----------------------------------------------------------------------------------------------------------
# memory and temperature


@pytest.fixture
def memory_runs(tmp_path) -> Path:
    root = tmp_path / "memory"
    make_run(root, "er_m10_s2", "er", 2, 44, 4, memory_size=10, bytes_per_clip=1000)
    make_run(root, "er_m10_s1", "er", 1, 40, 6, memory_size=10, bytes_per_clip=1000)
    make_run(root, "stella_m10_s1", "stella", 1, 45, 1, memory_size=10, bytes_per_clip=2000)
    make_run(root, "er_m20_s1", "er", 1, 50, 2, memory_size=20, bytes_per_clip=1000)
    make_run(root, "plus_m10_s1", "stella+", 1, 43, -1, memory_size=10, bytes_per_clip=600)
    make_run(root, "finetune_s1", "finetune", 1, 30, 9)
    return root


def test_memory_rows_bytes_and_best_per_memory_size(memory_runs):
    table = analysis.build_analysis("memory", report.expand_runs([str(memory_runs / "*")]))
    assert [g.label for g in table.groups] == ["ER (M = 10)", "ER (M = 20)", "STELLA (M = 10)", "STELLA+ (M = 10)"]
    assert cell(table, "ER (M = 10)", "A->V avg A") == pytest.approx((42.0, 2 ** 1.5, 2))  # 40, 44
    assert cell(table, "ER (M = 10)", "V->A avg F") == pytest.approx((6.0, 2 ** 0.5, 2))  # 7, 5
    # MiB = M x bytes per stored clip
    assert cell(table, "ER (M = 10)", "memory (MiB)") == (10 * 1000 / MIB, None, 1)
    assert cell(table, "ER (M = 20)", "memory (MiB)") == (20 * 1000 / MIB, None, 1)
    assert cell(table, "STELLA+ (M = 10)", "memory (MiB)") == (10 * 600 / MIB, None, 1)
    # best among the three methods of M = 10 (A: ER 42, STELLA 45, STELLA+ 43; F: 5, 1, -1); M = 20 has one row
    assert best(table, "A->V avg A") == ["STELLA (M = 10)"]
    assert best(table, "A->V avg F") == ["STELLA+ (M = 10)"]
    assert best(table, "V->A avg A") == ["STELLA (M = 10)"]  # 44, 47, 45
    assert "memory (MiB)" not in table.best
    assert any("finetune_s1: method 'finetune' keeps no replay memory" in n for n in table.notes)
    # the figure's one number per run: the mean over the two directions
    er10 = table.groups[0]
    assert er10.extra["A"] == [41.0, 45.0] and er10.extra["F"] == [6.5, 4.5] and er10.extra["line"] == "ER"


def test_memory_size_as_coded_forgetting(memory_runs):
    """--forgetting as-coded: task 2's drop counts too, a[0][1] - a[1][1] = 0 - a, over T - 1 = 1."""
    table = analysis.build_analysis("memory", [memory_runs / "er_m20_s1"], forgetting="as-coded")
    assert cell(table, "ER (M = 20)", "A->V avg F") == (2 + (0 - 50), None, 1)


def test_temperature_rows_and_best_per_method(tmp_path):
    root = tmp_path / "temperature"
    make_run(root, "st_t01_s1", "stella", 1, 40, 3, stella={"att_temperature": 0.1})
    make_run(root, "st_t01_s2", "stella", 2, 42, 5, stella={"att_temperature": 0.1})
    make_run(root, "st_t04_s1", "stella", 1, 45, 6, stella={"att_temperature": 0.4})
    make_run(root, "plus_t04_s1", "stella+", 1, 10, 0, stella={"att_temperature": 0.4})
    make_run(root, "er_s1", "er", 1, 60, 0)
    table = analysis.build_analysis("temperature", report.expand_runs([str(root / "*")]))
    assert [g.label for g in table.groups] == ["STELLA (τ = 0.1)", "STELLA (τ = 0.4)", "STELLA+ (τ = 0.4)"]
    assert cell(table, "STELLA (τ = 0.1)", "A->V avg A") == pytest.approx((41.0, 2 ** 0.5, 2))
    assert best(table, "A->V avg A") == ["STELLA (τ = 0.4)"]  # 45 > 41; STELLA+ alone in its line
    assert best(table, "A->V avg F") == ["STELLA (τ = 0.1)"]  # 4 < 6
    assert [g.extra["value"] for g in table.groups] == [0.1, 0.4, 0.4]
    assert [g.extra["series"] for g in table.groups] == [0, 0, 1]
    assert any("er_s1: method 'er' has no AVM temperature" in n for n in table.notes)


# ----------------------------------------------------------------------------------------------------------
# task order


def test_rank_average_shares_tied_ranks():
    assert analysis.rank_average({0: 5.0, 1: 7.0, 2: 7.0, 3: 1.0}) == {1: 1.5, 2: 1.5, 0: 3.0, 3: 4.0}
    assert analysis.rank_average({0: 2.0, 1: 3.0}) == {1: 1.0, 0: 2.0}


@pytest.fixture
def order_runs(tmp_path) -> Path:
    """Order 1 = t1, t2; order 2 = t2, t1. Mean over directions of A = a + 1: order 1 Finetune 31, ER 41, STELLA 45
    and 47 (two seeds: 46); order 2 Finetune 36, ER 51, STELLA 51 (a tie)."""
    root = tmp_path / "order"
    make_run(root, "finetune_o1_s1", "finetune", 1, 30, 5)
    make_run(root, "er_o1_s1", "er", 1, 40, 4)
    make_run(root, "stella_o1_s1", "stella", 1, 44, 3)
    make_run(root, "stella_o1_s2", "stella", 2, 46, 1)
    make_run(root, "finetune_o2_s1", "finetune", 1, 35, 7, tasks=("t2", "t1"))
    make_run(root, "er_o2_s1", "er", 1, 50, 2, tasks=("t2", "t1"))
    make_run(root, "stella_o2_s1", "stella", 1, 50, 2, tasks=("t2", "t1"))
    make_run(root, "multitask_s1", "multitask", 1, 60, 0)
    return root


def test_task_order_mean_over_orders_and_ranks(order_runs):
    paths = sorted(order_runs.iterdir(), key=lambda p: ("_o2_" in p.name, p.name))  # order 1's runs first
    table = analysis.build_analysis("task-order", paths)
    assert [g.label for g in table.groups] == ["Finetune", "ER", "STELLA"]
    assert [len(g.runs) for g in table.groups] == [2, 2, 3]
    a, sd, n = cell(table, "STELLA", "A->V avg A")  # 44, 46, 50 over both orders
    assert (a, n) == (pytest.approx(140 / 3), 3) and sd == pytest.approx(3.0550504633)
    assert cell(table, "ER", "A->V avg F") == pytest.approx((3.0, 2 ** 0.5, 2))
    assert [cell(table, m, "rank order 1")[0] for m in ("Finetune", "ER", "STELLA")] == [3.0, 2.0, 1.0]
    assert [cell(table, m, "rank order 2")[0] for m in ("Finetune", "ER", "STELLA")] == [3.0, 1.5, 1.5]
    assert cell(table, "STELLA", "mean rank") == pytest.approx((1.25, 0.5 / 2 ** 0.5, 2))  # ranks 1, 1.5
    assert cell(table, "Finetune", "mean rank") == (3.0, 0.0, 2)
    assert best(table, "mean rank") == ["STELLA"] and best(table, "rank order 2") == ["ER", "STELLA"]
    assert "order 1: t1 -> t2" in table.notes and "order 2: t2 -> t1" in table.notes
    assert any("multitask_s1: Multitask learns every task at once" in n for n in table.notes)
    assert table.groups[2].extra["order_A"] == {0: 46.0, 1: 51.0}
    assert table.groups[2].extra["command"].startswith("for run in ") and "stella_o2_s1" in \
        table.groups[2].extra["command"]


# ----------------------------------------------------------------------------------------------------------
# modality gap


@pytest.fixture
def gap_runs(tmp_path) -> Path:
    root = tmp_path / "gap"
    make_run(root, "finetune_s1", "finetune", 1, 30, 5, gaps=[(0.5, 0.9, 0.8), (0.7, 0.85, 0.75)])
    make_run(root, "finetune_s2", "finetune", 2, 32, 5, gaps=[(0.7, 0.7, 0.6), (0.9, 0.65, 0.55)])
    make_run(root, "stella_s1", "stella", 1, 40, 2, gaps=[(0.4, 0.9, 0.9), (0.45, 0.8, 0.85)])
    make_run(root, "multitask_s1", "multitask", 1, 60, 0, gaps=[(0.3, 0.95, 0.9)])
    make_run(root, "er_s1", "er", 1, 50, 1)  # no modality_gap in its rows
    return root


def test_gap_after_each_task_per_method(gap_runs):
    table = analysis.build_analysis("modality-gap", report.expand_runs([str(gap_runs / "*")]))
    assert [g.label for g in table.groups] == ["Multitask", "Finetune", "STELLA"]
    assert table.columns == ["gap t1", "gap t2", "spread audio t1", "spread audio t2", "spread video t1",
                             "spread video t2"]
    assert cell(table, "Finetune", "gap t1") == pytest.approx((0.6, 0.02 ** 0.5, 2))
    assert cell(table, "Finetune", "spread video t2") == pytest.approx((0.65, 0.02 ** 0.5, 2))
    assert cell(table, "STELLA", "gap t2") == (0.45, None, 1)
    assert cell(table, "Multitask", "gap t1") is None and cell(table, "Multitask", "gap t2") == (0.3, None, 1)
    assert table.best == {}
    assert any("er_s1: no modality gap" in n and "stella eval RUN --task retrieval" in n for n in table.notes)
    assert "best per column" not in report.to_markdown(table)


# ----------------------------------------------------------------------------------------------------------
# the CLI: tables, figures, wrong input


@pytest.mark.parametrize("kind", ["memory", "task-order", "modality-gap", "temperature"])
def test_each_figure_is_a_png(tmp_path, memory_runs, order_runs, gap_runs, kind):
    if kind == "temperature":
        for i, tau in enumerate((0.1, 0.2, 0.4)):
            make_run(tmp_path / "temperature", f"stella_t{i}", "stella", 1, 40 + i, 3 - i,
                     stella={"att_temperature": tau})
    runs = {"memory": memory_runs, "task-order": order_runs, "modality-gap": gap_runs,
            "temperature": tmp_path / "temperature"}
    table = analysis.build_analysis(kind, report.expand_runs([str(runs[kind] / "*")]))
    w, h = assert_png(analysis.analysis_figure(table, tmp_path))
    assert w > h  # panels side by side


def test_cli_writes_the_analysis_table_and_figure(tmp_path, memory_runs):
    out = tmp_path / "out"
    proc = cli("report", str(memory_runs / "*"), "--table", "memory", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ER (M = 10)" in proc.stdout and "42.00 ± 2.83" in proc.stdout
    saved = json.loads((out / "memory.json").read_text())
    assert [r["row"] for r in saved["rows"]] == ["ER (M = 10)", "ER (M = 20)", "STELLA (M = 10)", "STELLA+ (M = 10)"]
    assert saved["rows"][0]["values"]["A->V avg A"]["values"] == [40.0, 44.0]
    assert "**bold** = best per column" in (out / "memory.md").read_text()
    assert (out / "memory.csv").is_file()
    assert_png(out / "memory.png")
    assert not (out / "runs").exists()  # no per-run figures for an analysis


def test_cli_wrong_input_is_one_line_and_exit_2(tmp_path, gap_runs):
    lone = tmp_path / "lone"
    make_run(lone, "er_s1", "er", 1, 50, 1)
    out = ["--out", str(tmp_path / "reports")]
    cases = [(["report", str(gap_runs), "--table", "gap"], "--table 'gap': choose one of retrieval, efficiency, "
                                                            "downstream, ablation, memory, task-order"),
             (["report", str(lone / "er_s1"), "--table", "modality-gap"], "no run to analyse among the given paths "
                                                                          "(skipped"),
             (["report", str(lone / "er_s1"), "--table", "temperature"], "method 'er' has no AVM temperature"),
             (["report", str(tmp_path / "nothing"), "--table", "memory"], "nothing: no such run directory"),
             (["report", str(gap_runs / "*"), "--table", "memory", "--forgetting", "x"], "--forgetting 'x'")]
    for (code, output), (args, message) in zip(cli_many(*[args + out for args, _ in cases]), cases):
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, output)
    assert not (tmp_path / "reports").exists()  # nothing written
