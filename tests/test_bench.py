"""`stella bench` (bench.py): saved-for-backward accounting, the attention kernels, ratios, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from stella_cli.bench import ROW_KEYS, SavedBytes, add_ratios, all_methods, attention_kernel, parse_methods
from stella_cli.errors import StellaError
from stella_cli.factory import METHODS

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_saved_bytes_counts_each_storage_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(10, 10))
    x = torch.randn(3, 10, requires_grad=True)
    with SavedBytes(exclude=[w]) as saved:
        y = x @ w  # saves x (120 bytes) and w (a parameter: not counted)
        z = y.exp()  # saves its output: a new (3, 10) storage, 120 bytes
        (x[0] * x[1]).sum()  # two views of x: the same storage, already counted
    assert saved.total == 3 * 10 * 4 + 3 * 10 * 4
    assert len(saved.storages) == 2
    z.sum().backward()  # the hooks leave the graph intact
    assert x.grad.shape == (3, 10)


def test_math_kernel_keeps_the_attention_map_and_gives_the_same_output():
    B, H, N, d = 2, 2, 128, 8
    q, k, v = (torch.randn(B, H, N, d, requires_grad=True) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v)
    with attention_kernel("math"), SavedBytes() as math_saved:
        out = F.scaled_dot_product_attention(q, k, v)
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored on exit
    with SavedBytes() as sdpa_saved:
        F.scaled_dot_product_attention(q, k, v)
    attention_map = B * H * N * N * 4
    assert torch.allclose(out, reference, atol=1e-5)
    assert math_saved.total >= attention_map  # softmax(q·kᵀ) is saved for backward
    assert sdpa_saved.total < attention_map  # the fused kernel keeps O(N·d), not the N×N map
    with pytest.raises(StellaError, match="--attention 'flash'"):
        with attention_kernel("flash"):
            pass


def test_ratios_are_relative_to_derpp_else_the_first_row():
    def row(name, t, a, p):
        return {"method": name, "iter_s": t, "activation_bytes": a, "peak_bytes": p}

    rows = [row("stella", 3.0, 520, 30), row("derpp", 4.0, 1000, 60), row("er", 2.0, 1000, 90)]
    assert add_ratios(rows) == "derpp"
    assert [(r["iter_ratio"], r["activation_ratio"], r["peak_ratio"]) for r in rows] == [
        (0.75, 0.52, 0.5), (1.0, 1.0, 1.0), (0.5, 1.0, 1.5)]
    assert {r["reference"] for r in rows} == {"derpp"}
    rows = [row("finetune", 2.0, 400, 10), row("stella", 3.0, 500, 25)]
    assert add_ratios(rows) == "finetune"
    assert (rows[1]["iter_ratio"], rows[1]["activation_ratio"], rows[1]["peak_ratio"]) == (1.5, 1.25, 2.5)


def test_method_names():
    # multitask is finetune's learner; avm_pretrain is a step of the initialisation chain, not a compared method
    assert all_methods() == ["finetune", "er", "mir", "derpp", "gmed", "clser", "esmer", "lump", "stella", "stella+"]
    assert set(all_methods()) == set(METHODS) - {"multitask", "avm_pretrain"}
    assert len(all_methods()) == 10
    assert parse_methods("all") == all_methods()
    assert parse_methods(" stella, finetune,stella ") == ["stella", "finetune"]
    with pytest.raises(StellaError, match="unknown method 'derp'"):
        parse_methods("stella,derp")


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stella_cli", "bench", *args], capture_output=True, text=True,
                          env={**ENV, "COLUMNS": "200"}, timeout=600)  # wide enough that rich does not wrap


def test_bench_json_rows_for_finetune_stella_and_stella_plus():
    """Tiny model at the paper's input sizes; one buffer-filling step (memory 2 = the batch), one timed step."""
    done = bench_cli("--methods", "finetune,stella,stella+", "--preset", "tiny", "--steps", "1", "--memory", "2",
                     "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["method"] for r in rows] == ["finetune", "stella", "stella+"]
    ref = rows[0]  # DER++ not selected
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert (r["preset"], r["batch"], r["attention"], r["device"], r["reference"]) == ("tiny", 2, "sdpa", "cpu",
                                                                                          "finetune")
        assert r["iter_s"] > 0 and r["activation_bytes"] > 0 and r["peak_bytes"] > 0
        assert r["iter_ratio"] == r["iter_s"] / ref["iter_s"]
        assert r["activation_ratio"] == r["activation_bytes"] / ref["activation_bytes"]
        assert r["peak_ratio"] == r["peak_bytes"] / ref["peak_bytes"]
    assert ref["iter_ratio"] == ref["activation_ratio"] == ref["peak_ratio"] == 1.0


def test_bench_rejects_an_unknown_method_with_one_line():
    done = bench_cli("--methods", "stella,bogus", "--preset", "tiny")
    assert done.returncode == 2
    assert len(done.stdout.strip().splitlines()) == 1 and "unknown method 'bogus'" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert "measuring" not in done.stderr  # refused before anything ran


def test_bench_runs_the_virtual_update_methods_against_derpp():
    """MIR and GMED take their virtual Adam step with the optimiser the Trainer hands them (attach_optimizer)."""
    done = bench_cli("--methods", "derpp,mir,gmed", "--preset", "tiny", "--steps", "1", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["method"] for r in rows] == ["derpp", "mir", "gmed"]
    assert all(r["reference"] == "derpp" and r["activation_bytes"] > 0 for r in rows)
    assert rows[0]["activation_ratio"] == 1.0
