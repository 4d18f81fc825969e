"""Patch-selection ablations (`method.stella.selection`, baselines.md §2.13): what each variant selects and
computes, and `full` equal to STELLA as it was before the option existed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import PAPER_SIZES, batch, make_method, record_sequences, retrieval_rows, tiny_recipe

from stella_cli import select, stella
from stella_cli.config import RecipeError, StellaConfig, load_recipe
from stella_cli.stella import Stella, StellaPlus
from stella_cli.train import run

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_frames=2, image_size=32, target_length=64, num_mel_bins=32)  # L_V = 8, L_A = 8 (4 times x 2)
VARIANTS = ("full", "random", "importance", "correlation")


def make(cls, selection, sizes=SMALL, memory=4):
    return make_method(cls, sizes=sizes, memory=memory, stella=StellaConfig(selection=selection))


def train_steps(method, n, sizes=SMALL):
    """n optimiser steps; returns the losses of each and the core orderings (first K entries) select() chose."""
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    orders, losses, select_fn = [], [], method.select

    def recording(*args, **kwargs):
        core = select_fn(*args, **kwargs)
        orders.append((core["order_v"][:, :method.K_V].tolist(), core["order_a"][:, :method.K_A].tolist()))
        return core

    method.select = recording
    for step in range(n):
        step_losses = method.step(batch(seed=step, sizes=sizes))
        losses.append(sum(v.item() for v in step_losses.values()))
        opt.zero_grad()
        sum(step_losses.values()).backward()
        opt.step()
    return losses, orders


# Recorded with the code before `selection` existed (commit 4a77b8e) under torch 2.13: core orderings and summed
# losses of 4 Adam steps at lr 1e-3, seed 0, B = 2, memory 4. The orderings are exact; the losses are floats (same
# code, same order of operations, so equal to ~1e-6 on any machine). Another torch draws other random numbers from
# the same seed (torch 2.5.1 agrees on step 1 and differs from step 2, when replay sampling starts), so the
# recording holds for the torch it was made with.
BEFORE = {
    Stella: ([2.770983, 4.289356, 4.422884, 4.0439], [
        ([[6, 1, 5, 7], [4, 7, 5, 6]], [[2, 1, 6, 0], [3, 2, 5, 4]]),
        ([[7, 4, 6, 0], [1, 7, 0, 6], [6, 3, 1, 4], [0, 2, 1, 5]],
         [[0, 1, 2, 4], [0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7]]),
        ([[5, 7, 4, 2], [6, 5, 0, 3], [1, 2, 5, 7], [4, 6, 7, 1]],
         [[4, 5, 6, 7], [2, 3, 4, 5], [4, 5, 6, 7], [0, 1, 2, 3]]),
        ([[4, 6, 1, 0], [5, 6, 0, 4], [5, 3, 0, 6], [6, 3, 0, 2]],
         [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 7], [0, 1, 2, 4]])]),
    StellaPlus: ([2.770983, 3.461525, 3.276816, 4.057486], [
        ([[6, 1, 5, 7], [4, 7, 5, 6]], [[2, 1, 6, 0], [3, 2, 5, 4]]),
        ([[0, 2, 4, 7], [1, 3, 5, 7], [6, 1, 5, 7], [4, 7, 5, 6]],
         [[0, 1, 2, 3], [4, 5, 6, 7], [2, 1, 6, 0], [3, 2, 5, 4]]),
        ([[1, 3, 4, 6], [0, 3, 5, 6], [6, 1, 5, 7], [0, 2, 4, 7]],
         [[0, 1, 2, 3], [2, 3, 4, 5], [2, 1, 6, 0], [0, 1, 2, 3]]),
        ([[2, 3, 4, 6], [0, 2, 4, 5], [0, 3, 5, 6], [1, 3, 5, 7]],
         [[0, 1, 2, 3], [4, 5, 6, 7], [2, 3, 4, 5], [4, 5, 6, 7]])]),
}


@pytest.mark.skipif(not torch.__version__.startswith("2.13."), reason="recorded with torch 2.13's random streams")
@pytest.mark.parametrize("cls", [Stella, StellaPlus])
def test_full_selection_is_stella_as_before(cls):
    losses, orders = train_steps(make(cls, "full"), 4)
    expected_losses, expected_orders = BEFORE[cls]
    assert orders == expected_orders
    assert losses == pytest.approx(expected_losses, rel=1e-5)


def capture(monkeypatch, module, name):
    """Record the (weights, pruning mask) arguments of a selection function as the method calls it."""
    calls = []
    original = getattr(module, name)

    def wrapper(w, z, *args, **kwargs):
        calls.append((w.clone(), z.clone()))
        return original(w, z, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_random_has_no_avm_and_draws_k_patches_and_whole_audio_chunks():
    """Paper sizes: K_V = 392 of 784 video patches; K_A = 256 of 512 audio tokens = 8 whole chunks of 4 time steps
    x 8 frequency bins, the same clips' selections differ between iterations, nothing frozen runs, p = 0."""
    method = make(Stella, "random", sizes=PAPER_SIZES)
    assert method.avm is None and not any("avm" in n for n, _ in method.named_parameters())
    calls = record_sequences(method)
    cores = []
    for step in range(2):  # empty buffer, then with replay
        select_fn = method.select
        method.select = lambda *a, **k: cores.append(select_fn(*a, **k)) or cores[-1]
        losses = method.step(batch(seed=0, sizes=PAPER_SIZES))  # the same two clips both times
        method.select = select_fn
        assert "loss_vam" not in losses and ("loss_pen" in losses) == (step == 1)
    assert all(requires_grad for _, _, requires_grad in calls)  # no frozen scoring pass
    for core in cores:
        for order_v, order_a in zip(core["order_v"], core["order_a"]):
            assert len(set(order_v[:392].tolist())) == 392 and core["video"].shape[1] == 392
            chunks = sorted(order_a[:256].tolist())
            starts = chunks[::32]
            assert all(s % 32 == 0 for s in starts)  # chunk = 4 time tokens x 8 frequency bins = 32 tokens
            assert chunks == [s + i for s in starts for i in range(32)]  # 8 whole, contiguous chunks
        assert not torch.equal(core["order_v"][0, :392].sort().values, torch.arange(392))  # not the first K
        assert core["p_v"].eq(0).all() and core["p_a"].eq(0).all()
    assert not torch.equal(cores[0]["order_v"][:2, :392], cores[1]["order_v"][:2, :392])  # redrawn each time
    assert set(method.buffer.fields) >= {"video", "audio", "p_v", "p_a"} and "q_bar_v" not in method.buffer.fields


def test_importance_only_never_prunes_and_samples_by_importance(monkeypatch):
    method = make(Stella, "importance")
    video_calls = capture(monkeypatch, stella, "select_video_patches")
    scores = []
    score_fn = method.score
    method.score = lambda *a: scores.append(score_fn(*a)) or scores[-1]
    for step in range(3):
        losses = method.step(batch(seed=step, sizes=SMALL))
        assert "loss_vam" in losses  # the AVM still learns: it gives I
    assert len(video_calls) == 2  # the first iteration is the plain top-K (B9), as in full
    for step, (w, z) in enumerate(video_calls, start=1):
        assert not z.any()  # p = 0: nothing is pruned
        assert torch.equal(w[:2], scores[step]["I_v"].float())  # current clips weighted by their I
    assert method.buffer.fields["p_v"].eq(0).all() and method.buffer.fields["p_a"].eq(0).all()


def test_correlation_only_prunes_by_rca_and_chooses_uniformly(monkeypatch):
    method = make(Stella, "correlation")
    video_calls = capture(monkeypatch, stella, "select_video_patches")
    for step in range(3):
        method.step(batch(seed=step, sizes=SMALL))
    assert len(video_calls) == 3  # no importance top-K in the first iteration either: uniform draw
    for w, _ in video_calls:
        assert torch.equal(w, torch.full_like(w, 1 / 8))  # uniform weights, L_V = 8
    assert not video_calls[0][1].any()  # empty buffer: no RCA, no pruning
    p_v = method.buffer.fields["p_v"]
    assert p_v.gt(0).any() and p_v.gt(0).sum(dim=1).le(method.K_V).all()  # RCA p on the K_V candidates only
    assert any(z.any() for _, z in video_calls[1:])  # and it prunes


def test_stella_plus_variants(monkeypatch):
    """STELLA+ (current clips only once the buffer is full): importance -> I weights and no pruning;
    correlation -> uniform weights with RCA; random -> uniform weights, no pruning, no AVM."""
    calls = capture(monkeypatch, select, "select_video_patches_plus")
    calls_direct = capture(monkeypatch, stella, "select_video_patches_plus")
    for variant, uniform, pruned in (("importance", False, False), ("correlation", True, True),
                                     ("random", True, False)):
        calls.clear(), calls_direct.clear()
        method = make(StellaPlus, variant)
        for step in range(4):
            method.step(batch(seed=step, sizes=SMALL))
        (w0, z0), *_ = made = calls + calls_direct
        assert len(made) == 3  # steps 2-4
        assert all(torch.equal(w, torch.full_like(w, 1 / 8)) == uniform for w, _ in made), variant
        assert any(z.any() for _, z in made) == pruned, variant


def test_selection_is_checked_and_recipes_exist(tmp_path):
    with pytest.raises(RecipeError, match="method.stella.selection: 'randon' is not one of .*did you mean 'random'"):
        load_recipe(ROOT / "recipes" / "synthetic.yaml", ["method.stella.selection=randon"])
    dirs = set()
    for variant in VARIANTS:
        recipe = load_recipe(ROOT / "recipes" / f"synthetic_ablation_{variant}.yaml")
        assert recipe.method.name == "stella" and recipe.method.stella.selection == variant
        dirs.add(recipe.output.dir)
    assert len(dirs) == 4


def test_random_ablation_trains_end_to_end(tmp_path, data_root):  # noqa: F811
    run_dir = run(tiny_recipe(tmp_path, data_root, "random", "method.stella.selection=random"), quiet=True)
    assert [r["after_task"] for r in retrieval_rows(run_dir)] == ["task1", "task2"]
    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    assert state["method"] == {}  # no AVM weights
