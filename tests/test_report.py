"""`stella report` tables on hand-made result files (exact numbers) and every figure from tiny real runs."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import RANDOM_START, assert_png, tiny_synthetic

from stella_cli import report
from stella_cli.errors import StellaError
from stella_cli.evaluate import write_results

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "250"}  # rich: no wrapping
TASKS = ["t1", "t2"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stella_cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd or ROOT)


# ----------------------------------------------------------------------------------------------------------
# hand-made runs: 2 tasks, every R@K equal, so R@K avg = the matrix entry


def make_run(root: Path, name: str, method: str, seed: int, a2v: list[list[float]], v2a: list[list[float]],
             **method_keys) -> Path:
    """A run directory as `stella train` leaves it: config.yaml and results written by evaluate.write_results.
    a2v / v2a: a[l][k] for l = rows trained (one row 'all' for multitask)."""
    run = root / name
    config = {"data": {"dataset": "synthetic", "root": "data/synthetic"}, "model": {"preset": "tiny"},
              "method": {"name": method, "memory_size": 200, **method_keys}, "train": {"seed": seed},
              "output": {"dir": str(run)}}
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    trained = ["all"] if method == "multitask" else TASKS[:len(a2v)]
    history = [{"after_task": t, "step": l, "scores": {
        d: {"all": {}, **{task: {f"R@{k}": m[l][i] for k in (1, 5, 10)} for i, task in enumerate(TASKS)}}
        for d, m in (("a2v", a2v), ("v2a", v2a))}} for l, t in enumerate(trained)]
    write_results(run / "results", history, TASKS, [1, 5, 10])
    return run


# a[l][k]; conventional F (T = 2) = a[0][0] - a[1][0]; as coded = that + (a[0][1] - a[1][1])
FT1 = [[50, 10], [30, 60]]  # A 45, F 20, F_as_coded -30
FT2 = [[40, 10], [30, 50]]  # A 40, F 10, F_as_coded 10 - 40 = -30
ST1 = [[50, 10], [48, 56]]  # A 52, F 2, F_as_coded -44
ST2 = [[50, 10], [46, 54]]  # A 50, F 4, F_as_coded -40


@pytest.fixture
def runs(tmp_path) -> Path:
    """Finetune and STELLA with 2 seeds each (V->A with the roles swapped), Multitask, STELLA with another
    memory size, and an unknown method; created in an order unlike the paper's."""
    root = tmp_path / "runs"
    make_run(root, "stella_s2", "stella", 2, ST2, FT2)
    make_run(root, "zzz_s1", "zzz", 1, FT1, FT1)
    make_run(root, "finetune_s1", "finetune", 1, FT1, ST1)
    make_run(root, "stella_s1", "stella", 1, ST1, FT1)
    make_run(root, "multitask_s1", "multitask", 1, [[70, 80]], [[70, 80]])
    make_run(root, "finetune_s2", "finetune", 2, FT2, ST2)
    make_run(root, "stella_mem100", "stella", 1, ST1, ST1, memory_size=100)
    return root


def row(table: report.Table, label: str) -> int:
    return [g.label for g in table.groups].index(label)


def test_seeds_are_grouped_with_mean_and_std_in_paper_order(runs):
    table = report.build_table("retrieval", report.expand_runs([str(runs / "*")]))
    assert [g.label for g in table.groups] == ["Multitask", "Finetune", "STELLA (method.memory_size=100)",
                                               "STELLA (method.memory_size=200)", "zzz"]  # same method: by path
    ft, st = row(table, "Finetune"), row(table, "STELLA (method.memory_size=200)")
    assert [str(r.path.name) for r in table.groups[ft].runs] == ["finetune_s1", "finetune_s2"]
    assert table.stat(ft, "A->V avg A") == pytest.approx((42.5, 2.5 * 2 ** 0.5, 2))  # mean, sample std, n
    assert table.stat(ft, "A->V avg F") == pytest.approx((15.0, 5 * 2 ** 0.5, 2))
    assert table.stat(st, "A->V R@5 A") == pytest.approx((51.0, 2 ** 0.5, 2))
    assert table.stat(st, "A->V R@10 F") == pytest.approx((3.0, 2 ** 0.5, 2))
    assert table.stat(st, "V->A avg A") == pytest.approx((42.5, 2.5 * 2 ** 0.5, 2))
    mt = row(table, "Multitask")
    assert table.stat(mt, "A->V avg A") == (75.0, None, 1) and table.stat(mt, "A->V avg F") is None
    assert len(table.columns) == 16 and table.columns[:3] == ["A->V R@1 A", "A->V R@1 F", "A->V R@5 A"]
    rows = report.table_rows(table)
    assert rows[1 + ft][:3] == ["Finetune", "2", "42.50 ± 3.54"]
    assert rows[1 + mt][2:4] == ["75.00", "-"]


def test_best_per_column_max_for_A_min_for_F_multitask_excluded(runs):
    table = report.build_table("retrieval", report.expand_runs([str(runs / "*")]))
    ft, st, st100 = row(table, "Finetune"), row(table, "STELLA (method.memory_size=200)"), \
        row(table, "STELLA (method.memory_size=100)")
    assert table.best["A->V avg A"] == {st100}  # 52 > 51 > 45 (zzz) > 42.5; Multitask's 75 is not a candidate
    assert table.best["A->V avg F"] == {st100}  # 2 < 3
    assert table.best["V->A avg A"] == {st100}  # 52 > 51 (Finetune's swapped roles)
    assert table.best["V->A avg F"] == {st100}
    ft_only = report.build_table("retrieval", [runs / "finetune_s1", runs / "finetune_s2", runs / "stella_s1",
                                               runs / "stella_s2", runs / "multitask_s1"])
    ft, st = row(ft_only, "Finetune"), row(ft_only, "STELLA")
    assert ft_only.best["A->V avg A"] == {st} and ft_only.best["V->A avg A"] == {ft}
    assert ft_only.best["A->V R@1 F"] == {st} and ft_only.best["V->A R@1 F"] == {ft}
    md = report.to_markdown(ft_only)
    assert "| STELLA | 2 | **51.00 ± 1.41** | **3.00 ± 1.41** |" in md
    assert "| Multitask | 1 | 75.00 | - |" in md  # higher A, never bold
    parsed = list(csv.DictReader(io.StringIO(report.to_csv(ft_only))))
    assert parsed[ft]["V->A avg A"] == "51" and parsed[ft]["V->A avg A std"] == "1.41421"
    assert "V->A avg A" in parsed[ft]["best"].split(";") and parsed[ft]["seeds"] == "1 2"


def test_forgetting_as_coded(runs):
    table = report.build_table("retrieval", [runs / "finetune_s1", runs / "finetune_s2", runs / "stella_s1",
                                             runs / "stella_s2"], forgetting="as-coded")
    assert table.stat(row(table, "Finetune"), "A->V avg F") == (-30.0, 0.0, 2)
    assert table.stat(row(table, "STELLA"), "A->V avg F") == pytest.approx((-42.0, 2 * 2 ** 0.5, 2))
    assert table.best["A->V avg F"] == {row(table, "STELLA")}


def test_ablation_rows_by_selection_variant(tmp_path):
    root = tmp_path / "abl"
    for i, sel in enumerate(["correlation", None, "random", "importance"]):
        keys = {"stella": {"selection": sel}} if sel else {}
        make_run(root, f"s_{i}", "stella", 1, [[50, 10], [40 + i, 50]], ST1, **keys)
    make_run(root, "ft", "finetune", 1, FT1, FT1)
    table = report.build_table("ablation", report.expand_runs([str(root / "*")]))
    assert [g.label for g in table.groups] == ["STELLA / full", "STELLA / random", "STELLA / importance",
                                               "STELLA / correlation"]
    assert table.stat(0, "A->V R@1 F") == (9.0, None, 1)  # absent selection = full = s_1: 50 - 41
    assert table.stat(3, "A->V R@1 F") == (10.0, None, 1)  # correlation = s_0: 50 - 40
    assert table.best["A->V R@1 F"] == {2}  # importance = s_3: 50 - 43 = 7, the least forgetting
    assert any("has no selection variants" in n for n in table.notes)


def test_incomplete_runs_are_skipped_and_globs_expand(tmp_path, runs):
    make_run(runs, "half", "stella", 3, [[50, 10]], [[50, 10]])  # only task 1 trained
    (runs / "stella_train.log").write_text("a stray file")  # globs keep run directories only
    (runs / "stella_plots").mkdir()
    table = report.build_table("retrieval", report.expand_runs([str(runs / "stella_*"), str(runs / "half")]))
    assert [g.label for g in table.groups] == ["STELLA (method.memory_size=100)", "STELLA (method.memory_size=200)"]
    assert any("half: 1 of 2 tasks trained" in n for n in table.notes)
    with pytest.raises(StellaError, match="no such run directory"):
        report.expand_runs([str(tmp_path / "nothing_*")])
    with pytest.raises(StellaError, match="not a run directory"):
        report.build_table("retrieval", report.expand_runs([str(runs / "stella_plots")]))  # named: refused


def test_efficiency_and_downstream_tables(tmp_path, runs):
    bench = tmp_path / "bench.json"
    common = {"preset": "tiny", "batch": 2, "attention": "sdpa", "device": "cpu"}
    bench.write_text(json.dumps([
        {"method": "stella", "iter_s": 0.5, "activation_bytes": 2 ** 21, "peak_bytes": 2 ** 22, "iter_ratio": 0.5,
         "activation_ratio": 0.5, "peak_ratio": 0.8, **common},
        {"method": "finetune", "iter_s": 1.0, "activation_bytes": 2 ** 22, "peak_bytes": 2 ** 23, "iter_ratio": 1.0,
         "activation_ratio": 1.0, "peak_ratio": 1.0, **common}]))
    table = report.build_table("efficiency", [bench])
    assert [g.label for g in table.groups] == ["Finetune", "STELLA"]
    assert table.stat(1, "activation (MiB)") == (2.0, None, 1) and table.best["peak (MiB)"] == {1}
    for name, value in (("finetune_s1", 60.0), ("finetune_s2", 70.0), ("stella_s1", 80.0)):
        (runs / name / "results" / "classification.json").write_text(json.dumps(
            {"task": "classification", "checkpoint": "latest.pt", "recipe": "r", "command": f"stella eval {name}",
             "metrics": {"top1": value, "loss": 100 - value}}))
    (runs / "stella_s1" / "results" / "ave.json").write_text(json.dumps(
        {"task": "ave", "checkpoint": "latest.pt", "recipe": "r", "command": "e", "metrics": {"accuracy": 33.0}}))
    down = report.build_table("downstream", report.expand_runs([str(runs / "*")]))
    assert down.columns == ["classification top1", "classification loss", "ave accuracy"]
    ft, st = row(down, "Finetune"), row(down, "STELLA")
    assert down.stat(ft, "classification top1") == pytest.approx((65.0, 50 ** 0.5, 2))
    assert down.best["classification top1"] == {st} and down.best["classification loss"] == {st}
    assert report.command_of(down.groups[ft]) == "stella eval finetune_s1; stella eval finetune_s2"


def test_cli_writes_tables_and_figures(tmp_path, runs):
    out = tmp_path / "out"
    proc = cli("report", str(runs / "finetune_*"), str(runs / "stella_s*"), str(runs / "multitask_s1"), "--out",
               str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Finetune" in proc.stdout and "42.50 ± 3.54" in proc.stdout
    saved = json.loads((out / "retrieval.json").read_text())
    assert [r["row"] for r in saved["rows"]] == ["Multitask", "Finetune", "STELLA"]
    assert saved["rows"][1]["values"]["A->V avg F"]["values"] == [20.0, 10.0]
    assert saved["rows"][2]["command"] == (f"for seed in 1 2; do stella train {runs / 'stella_s1' / 'config.yaml'} "
                                           f"--set train.seed=$seed --set output.dir={runs}/stella_rerun_s$seed; done")
    assert (out / "retrieval.md").read_text().count("\n| ") >= 8 and (out / "retrieval.csv").is_file()
    for png in ["retrieval_bars.png", "runs/finetune_s1_accuracy_matrix.png", "runs/stella_s2_stream.png",
                "runs/multitask_s1_accuracy_matrix.png", "runs/multitask_s1_stream.png"]:
        assert_png(out / png)


def test_out_may_be_a_link_to_a_folder_not_made_yet(tmp_path, runs):
    """The Docker image's reports -> /runs/reports, in a runs folder that holds no reports yet."""
    (tmp_path / "reports").symlink_to(tmp_path / "mounted" / "reports")
    proc = cli("report", str(runs / "finetune_*"), "--out", str(tmp_path / "reports"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "mounted" / "reports" / "retrieval.md").is_file()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in [(["report", str(tmp_path / "missing_run")], "no such run directory"),
                          (["report", str(tmp_path), "--table", "speed"], "--table 'speed'")]:
        proc = cli(*args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------
# figures from tiny real runs


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """STELLA trained through the CLI (so its end-of-run plots are `stella train`'s) and STELLA+ in-process:
    tiny preset, 2 tasks x 1 epoch x 4 steps."""
    from stella_cli.config import load_recipe
    from stella_cli.train import run

    tmp = tmp_path_factory.mktemp("report_runs")
    data = tmp / "data"
    tiny_synthetic(data)
    tiny = [f"data.root={data}", "data.num_workers=0", "model.preset=tiny", "method.memory_size=12",
            "train.epochs=1", "train.batch_size=4", "train.log_every=1", *RANDOM_START]
    runs = {"stella": tmp / "stella", "stella+": tmp / "stella_plus"}
    proc = cli("train", "recipes/synthetic.yaml", "--quiet", *[a for o in tiny for a in ("--set", o)],
               "--set", f"output.dir={runs['stella']}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plots: " in proc.stdout
    run(load_recipe(ROOT / "recipes" / "synthetic.yaml", [*tiny, "method.name=stella+",
                                                          f"output.dir={runs['stella+']}"]), quiet=True)
    return runs


def test_train_writes_the_heatmap_stream_plot_and_loss_curves(tiny_runs):
    run = tiny_runs["stella"]
    w, h = assert_png(run / "plots" / "accuracy_matrix.png")
    assert w > h  # two panels side by side
    assert_png(run / "plots" / "stream.png")
    w, h = assert_png(run / "plots" / "losses.png")
    assert w > 1000 and h > 500  # 3 x 2 panels: loss and STELLA's five terms


def test_report_draws_the_loss_curves_of_every_run_it_reads(tiny_runs, tmp_path):
    unfinished = tmp_path / "unfinished"  # its task-2 retrieval is not there yet: not in the table, still drawn
    shutil.copytree(tiny_runs["stella"], unfinished)
    (unfinished / "results" / "summary.json").write_text(json.dumps(
        {**json.loads((unfinished / "results" / "summary.json").read_text()), "trained": ["task1"]}))
    proc = cli("report", str(tiny_runs["stella"]), str(tiny_runs["stella+"]), str(unfinished), "--out",
               str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" in proc.stdout and "1 of 2 tasks trained" in proc.stdout
    for name in ("stella", "stella_plus", "unfinished"):
        assert_png(tmp_path / "out" / "runs" / f"{name}_losses.png")


def test_loss_series_and_its_moving_average():
    from stella_cli.plots import loss_series, moving_average

    def line(step, task, **terms):
        return {"step": step, "time": 0.0, "task": task, "epoch": 0, **terms, "loss": sum(terms.values()),
                "clips_per_s": 1.0, "lr": 1e-4}

    records = [line(1, "t1", loss_mae_a=1.0), line(2, "t1", loss_mae_a=0.75, loss_pen=0.5),
               {"step": 2, "time": 0.0, "event": "retrieval", "after_task": "t1", "scores": {}},
               line(3, "t2", loss_mae_a=2.0, loss_pen=0.25), line(4, "t2", loss_mae_a=1.5, loss_pen=0.0)]
    steps, values, tasks = loss_series(records)
    assert steps.tolist() == [1, 2, 3, 4] and list(values) == ["loss", "loss_mae_a", "loss_pen"]
    assert values["loss"].tolist() == [1.0, 1.25, 2.25, 1.5]
    assert np.isnan(values["loss_pen"][0]) and values["loss_pen"][1:].tolist() == [0.5, 0.25, 0.0]
    assert tasks == [("t1", 1, 2), ("t2", 3, 4)]  # first and last logged step of each task
    smooth = moving_average(np.array([1.0, 2.0, 3.0, 4.0, np.nan, 6.0]), 3)  # centred; NaN kept, not averaged in
    assert smooth[[0, 1, 2, 3, 5]].tolist() == [1.5, 2.0, 3.0, 3.5, 6.0] and np.isnan(smooth[4])


def test_buffer_show_draws_clips_and_composition(tiny_runs, tmp_path):
    from stella_cli.plots import buffer_figures

    proc = cli("buffer", str(tiny_runs["stella"]), "--show", "2", "--out", str(tmp_path / "stella"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = {"stella": sorted((tmp_path / "stella").glob("*.png")),
               "stella+": buffer_figures(tiny_runs["stella+"], 2, tmp_path / "plus")}
    for method, paths in written.items():
        assert sorted(p.name for p in paths)[-1] == "composition.png"
        assert len([p for p in paths if p.name.startswith("clip_slot")]) == 2, method
        sizes = [assert_png(p) for p in paths]
        assert sizes[0][1] > 500  # a clip figure: frames, p_v, fbank, p_a rows (STELLA+: frames and fbank)


def test_buffer_composition_counts_and_replay_core(tiny_runs):
    import numpy as np
    import torch

    from stella_cli.checkpoint import task_checkpoints
    from stella_cli.plots import pick_slots, replay_core

    ckpts = task_checkpoints(tiny_runs["stella"])
    assert [c.name for c in ckpts] == ["task01_task1.pt", "task02_task2.pt"]
    fields = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["method_extra"]["buffer"]["fields"]
    task = fields["task"].numpy()
    slots = pick_slots(task, len(task), 3)
    assert len(set(slots)) == 3 and {int(task[s]) for s in slots} == {0, 1}  # both stored tasks shown
    clip = {k: v[slots[0]].numpy() for k, v in fields.items()}
    core_v, core_a = replay_core(clip, K_V=32, K_A=96, n_freq=8, chunk_times=4)
    assert len(set(core_v.tolist())) == 32 and len(set(core_a.tolist())) == 96  # distinct tokens, exactly K
    p_v = clip["p_v"]
    assert not np.isin(np.flatnonzero(p_v >= 1.0), core_v).any()  # a certainly-pruned patch is never core


def test_report_and_bench_bars_from_tables(tmp_path, runs):
    from stella_cli.plots import bench_bars, report_bars

    table = report.build_table("retrieval", report.expand_runs([str(runs / "*")]))
    w, _ = assert_png(report_bars(table, tmp_path / "bars.png"))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"method": m, "iter_s": s, "activation_bytes": 2 ** 20 * s, "peak_bytes": 2 ** 21 * s,
                                  "preset": "tiny", "batch": 2, "attention": "sdpa", "device": "cpu"}
                                 for m, s in (("finetune", 1.0), ("stella", 0.6), ("er", 1.1))]))
    assert_png(bench_bars(report.build_table("efficiency", [bench]), tmp_path / "bench.png"))


def final_row(a: float) -> list[list[float]]:
    """Two tasks whose final row averages to `a` (R@K avg = A), with forgetting 10 of task 1."""
    return [[a + 5, 0.0], [a - 5, a + 5]]


def test_paired_differences_against_every_baseline_and_the_best(tmp_path):
    """STELLA - ER over the seeds both ran: 1, 2, 3 -> 2.00 [-0.48, 4.48]; ER is the best baseline (DER++ lower);
    STELLA's seed 4 has no ER partner and is left out; Multitask is never a baseline."""
    root = tmp_path / "runs"
    for seed, (er, st, der) in enumerate([(40, 41, 30), (42, 44, 31), (44, 47, 35)], start=1):
        make_run(root, f"er_s{seed}", "er", seed, final_row(er), final_row(er))
        make_run(root, f"stella_s{seed}", "stella", seed, final_row(st), final_row(st - 2 * seed))
        make_run(root, f"derpp_s{seed}", "derpp", seed, final_row(der), final_row(der))
    make_run(root, "stella_s4", "stella", 4, final_row(90), final_row(90))
    make_run(root, "multitask_s1", "multitask", 1, [[70, 80]], [[70, 80]])
    table = report.build_table("retrieval", report.expand_runs([str(root / "*")]))
    by = {(p.row, p.against, p.column): p for p in table.paired}
    er = by[("STELLA", "ER", "A->V avg A")]
    assert (er.mean, er.n, er.seeds, er.best) == (2.0, 3, ["1", "2", "3"], True)
    assert (er.low, er.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6) and not er.resolved
    der = by[("STELLA", "DER++", "A->V avg A")]  # 11, 13, 12: mean 12, sd 1 -> resolved
    assert (der.mean, der.best, der.resolved) == (12.0, False, True)
    v2a = by[("STELLA", "ER", "V->A avg A")]  # STELLA's V->A is seed-dependent: -1, -2, -3
    assert v2a.mean == -2.0 and v2a.high == pytest.approx(-2 + 2.484138, abs=1e-6)
    f = by[("STELLA", "ER", "A->V avg F")]  # both forget 10 at every seed: sd 0, the interval is the point
    assert (f.mean, f.low, f.high) == (0.0, 0.0, 0.0)
    assert {p.against for p in table.paired} == {"ER", "DER++"} and {p.row for p in table.paired} == {"STELLA"}
    md = report.to_markdown(table)
    assert "| STELLA | A->V avg A | ER | +2.00 [-0.48, +4.48] | 3 | no |" in md
    assert "| STELLA - DER++ | +12.00 [+9.52, +14.48] |" in md
    saved = report.to_json(table)["paired"]
    assert {"row": "STELLA", "against": "ER", "column": "A->V avg A", "n": 3, "best": True,
            "resolved": False}.items() <= saved[0].items()
    lines = list(csv.DictReader(io.StringIO(report.paired_csv(table))))
    assert lines[0]["mean"] == "2" and lines[0]["seeds"] == "1 2 3" and lines[0]["best_baseline"] == "1"
    assert_png(report.write_figures(table, tmp_path / "out")[1])  # retrieval_paired.png


def test_rows_that_differ_in_their_start_say_so(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "pre", "stella", 1, FT1, FT1)
    make_run(root, "rand", "stella", 1, ST1, ST1)
    for name, avm in (("pre", "data/synthetic/init/avm/checkpoints/latest.pt"), ("rand", "")):
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        config["model"]["avm"] = {"checkpoint": avm}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config))
    table = report.build_table("retrieval", [root / "pre", root / "rand"])
    assert [g.label for g in table.groups] == ["STELLA (pre-trained AVM)", "STELLA (random AVM)"]
    assert table.paired == []  # two STELLA rows and no baseline: nothing to compare


def test_two_rows_of_one_method_rerun_into_folders_of_their_own(tmp_path):
    """STELLA with a pre-trained and with a random AVM, two seeds each: each row's rerun command writes to a folder
    named after its own runs, not after the method the two rows share."""
    root = tmp_path / "runs"
    for name, avm in (("synthetic_stella", "data/synthetic/init/avm/checkpoints/latest.pt"),
                      ("synthetic_stella_random_avm", "")):
        for seed in (1, 2):
            run = make_run(root, f"{name}_s{seed}", "stella", seed, ST1, ST1)
            config = yaml.safe_load((run / "config.yaml").read_text())
            config["model"]["avm"] = {"checkpoint": avm}
            (run / "config.yaml").write_text(yaml.safe_dump(config))
    table = report.build_table("retrieval", sorted(root.iterdir()))
    commands = sorted(report.command_of(g) for g in table.groups)
    assert commands == [f"for seed in 1 2; do stella train {root / f'{name}_s1' / 'config.yaml'} "
                        f"--set train.seed=$seed --set output.dir={root}/{name}_rerun_s$seed; done"
                        for name in ("synthetic_stella_random_avm", "synthetic_stella")]  # sorted
