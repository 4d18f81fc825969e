"""The replay baselines (baselines.py, baselines.md §2.3-2.9): what makes each one that method, on constructed
inputs with hand-computed expectations, plus the passes each runs and bit-exact virtual updates."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stella_cli.baselines import (ER, ClsEr, DERpp, Esmer, Gmed, Lump, Mir, clser_targets, esmer_weights,
                                  per_sample_loss, running_loss_stats, virtual_adam_step)
from stella_cli.config import AVMConfig, MethodConfig, ModelConfig, OptimConfig, load_recipe, resolve_model_preset
from stella_cli.factory import METHODS
from stella_cli.model import CAVMAE
from stella_cli.train import build_optimizer

N_V, N_A = 12, 8  # elements of a toy clip's video (1, 3, 2, 2) and audio (1, 4, 2)


class Toy(nn.Module):
    """A backbone with hand-computable losses: x_i = mean(video_i) + mean(audio_i), ℓ_i = (w − x_i)² (reported
    as loss_mae_v), z_a = z_v = w·x_i·[1, 1]. Records (pass, rows, grad enabled, w, video) of every call."""

    def __init__(self, w: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.calls: list[tuple] = []

    def no_weight_decay(self) -> set[str]:
        return set()

    def features(self, audio, video):
        return video.flatten(1).mean(1) + audio.flatten(1).mean(1)

    def forward(self, audio, video, ids_a=None, ids_v=None, reduction="mean", generator=None):
        self.calls.append(("full", video.shape[0], torch.is_grad_enabled(), self.w.item(), video.detach().clone()))
        x = self.features(audio, video)
        loss = (self.w - x) ** 2
        reduce = (lambda t: t) if reduction == "none" else (lambda t: t.mean())
        z = (self.w * x)[:, None].expand(-1, 2)
        return {"loss_mae_a": reduce(torch.zeros_like(loss)), "loss_mae_v": reduce(loss),
                "loss_con": reduce(torch.zeros_like(loss)), "z_a": z, "z_v": z}

    def encode_pooled(self, audio, video, generator=None):
        self.calls.append(("encoder", video.shape[0], torch.is_grad_enabled(), self.w.item(), None))
        z = (self.w * self.features(audio, video))[:, None].expand(-1, 2)
        return z, z


def clips(xs, first_index=0):
    """Toy clips whose feature x_i = xs[i] (half from the video, half from the audio)."""
    x = torch.tensor(xs, dtype=torch.float32)
    B = len(xs)
    return {"video": (x / 2).view(B, 1, 1, 1, 1).expand(B, 1, 3, 2, 2).clone(),
            "audio": (x / 2).view(B, 1, 1, 1).expand(B, 1, 4, 2).clone(),
            "label": torch.arange(B), "task": torch.zeros(B, dtype=torch.long),
            "index": torch.arange(B) + first_index}


def feature(video):
    return video.flatten(1).mean(1) * 2  # the x of toy clips (video holds half)


def method_cfg(name, **overrides):
    """MethodConfig with `{"gmed": {"beta": ...}}`-style overrides of the per-method sections."""
    cfg = MethodConfig(name=name)
    for key, value in overrides.items():
        setattr(cfg, key, dataclasses.replace(getattr(cfg, key), **value) if isinstance(value, dict) else value)
    return cfg


def toy_method(cls, name, *, B=2, memory=8, w=0.0, lr=0.5, **overrides):
    method = cls(Toy(w), method_cfg(name, **overrides), avm_cfg=AVMConfig(), batch_size=B,
                 memory_per_rank=memory, seed=0, rank=0, device=torch.device("cpu"))
    optimizer = torch.optim.Adam(method.parameters(), lr=lr, betas=(0.95, 0.999))
    method.attach_optimizer(optimizer, torch.amp.GradScaler("cpu", enabled=False))
    return method


def replay_order(method, n_filled, n):
    """The slots the next uniform draw will replay (a replica of the method's replay generator)."""
    replica = torch.Generator().manual_seed(0)
    replica.set_state(method.generators["replay"].get_state())
    return torch.randperm(n_filled, generator=replica)[:n]


# ----------------------------------------------------------------------------------------------------------
# concat-replay, DER++, LUMP


def test_er_concatenates_replay_after_the_current_batch_and_stores_only_current_clips():
    method = toy_method(ER, "er")
    method.step(clips([1.0, 2.0]))
    assert [c[:3] for c in method.backbone.calls] == [("full", 2, True)]  # empty buffer: B rows, no other pass
    method.backbone.calls.clear()
    slots = replay_order(method, 2, 2)
    method.step(clips([3.0, 4.0], first_index=2))
    (kind, rows, grad, _, video), = method.backbone.calls  # one pass, no frozen scoring pass
    assert (kind, rows, grad) == ("full", 4, True)
    assert feature(video).tolist() == [3.0, 4.0] + [[1.0, 2.0][s] for s in slots]  # [X_t; X_m]
    assert feature(method.buffer.fields["video"][:4]).tolist() == [1.0, 2.0, 3.0, 4.0]  # X_t only, in order
    assert method.buffer.fields["index"][:4].tolist() == [0, 1, 2, 3] and method.buffer.n_seen == 4


def test_derpp_penalty_on_stored_embeddings():
    """z stored at w = 0 are 0; at w = 1 the replayed rows give z = x·[1, 1] for x in {1, 2}: each MSE is
    (1 + 1 + 4 + 4) / 4 = 2.5, so the penalty is 0.5 · (2.5 + 2.5) = 2.5."""
    method = toy_method(DERpp, "derpp")
    method.step(clips([1.0, 2.0]))
    assert method.buffer.fields["z_a"][:2].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    with torch.no_grad():
        method.backbone.w.fill_(1.0)
    losses = method.step(clips([3.0, 4.0]))
    assert losses["loss_pen"].item() == pytest.approx(2.5)
    assert method.buffer.fields["z_v"][2:4].tolist() == [[3.0, 3.0], [4.0, 4.0]]  # this step's z of X_t
    assert "loss_pen" not in toy_method(ER, "er").step(clips([1.0, 2.0]))


def test_lump_trains_on_b_mixed_rows_and_stores_the_clean_clips():
    method = toy_method(Lump, "lump", lump={"mixup_alpha": 0.1})
    method.step(clips([1.0, 2.0]))
    slots = replay_order(method, 2, 2)
    lam = np.random.default_rng(5).beta(0.1, 0.1)  # the first draw of the method's λ generator (seed 0, rank 0)
    method.backbone.calls.clear()
    current = clips([3.0, 4.0])
    method.step(current)
    (kind, rows, grad, _, video), = method.backbone.calls
    assert (kind, rows, grad) == ("full", 2, True)  # B rows, not 2B: the clean batch is not trained
    stored = torch.tensor([1.0, 2.0])[slots]
    torch.testing.assert_close(feature(video), lam * torch.tensor([3.0, 4.0]) + (1 - lam) * stored)
    torch.testing.assert_close(method.buffer.fields["video"][2:4], current["video"])  # un-mixed
    torch.testing.assert_close(method.buffer.fields["audio"][2:4], current["audio"])


def test_lump_mixes_the_audio_with_the_same_lambda_as_the_video():
    """Silent current clips (audio 0, video halves 3/2, 4/2) mixed with stored x ∈ {1, 2} (halves x/2): the mixed
    row is x̃ = λ·3/2 + (1 − λ)·x/2 (video) + (1 − λ)·x/2 (audio), so at w = 0 the loss is mean_i x̃_i²; with the
    audio weights swapped (λ on the replayed audio) it would differ by (1 − 2λ)·x/2 per row."""
    method = toy_method(Lump, "lump", lump={"mixup_alpha": 0.5})
    method.step(clips([1.0, 2.0]))
    slots = replay_order(method, 2, 2)
    lam = np.random.default_rng(5).beta(0.5, 0.5)  # 0.765 (Beta(0.1, 0.1) draws 0.49 here: too close to 1/2)
    current = clips([3.0, 4.0])
    current["audio"].zero_()
    losses = method.step(current)
    stored = torch.tensor([1.0, 2.0], dtype=torch.float64)[slots]
    mixed = lam * torch.tensor([3.0, 4.0], dtype=torch.float64) / 2 + (1 - lam) * stored / 2 + (1 - lam) * stored / 2
    assert losses["loss_mae_v"].item() == pytest.approx((mixed ** 2).mean().item(), rel=1e-5)
    assert abs(1 - 2 * lam) > 0.5  # the draw tells the two weightings apart


def test_lump_with_fewer_stored_clips_than_the_batch_pairs_row_b_with_stored_row_b_mod_r():
    method = toy_method(Lump, "lump", B=3, memory=2)
    method.step(clips([1.0, 2.0, 3.0]))  # 2 slots: the reservoir keeps two of the three
    slots = replay_order(method, 2, 2)
    stored = feature(method.buffer.fields["video"])[slots][torch.tensor([0, 1, 0])]  # R = 2 rows for B = 3
    lam = np.random.default_rng(5).beta(0.1, 0.1)
    method.step(clips([4.0, 5.0, 6.0]))
    torch.testing.assert_close(feature(method.backbone.calls[-1][4]), lam * torch.tensor([4.0, 5.0, 6.0])
                               + (1 - lam) * stored)


# ----------------------------------------------------------------------------------------------------------
# virtual updates: MIR, GMED


def test_virtual_adam_step_matches_a_real_step_and_writes_no_state():
    """From an empty state, the state-free step moves w by lr·sign(g) (Adam's first step), like torch's Adam."""
    w = nn.Parameter(torch.tensor([0.0, 1.0]))
    optimizer = torch.optim.Adam([w], lr=0.5, betas=(0.95, 0.999))
    virtual_adam_step(optimizer, [torch.tensor([-4.0, 2.0])])
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, 0.5]))
    assert len(optimizer.state) == 0


def test_mir_replays_the_most_interfered_candidates():
    """Current x = 2 pulls w from 0 to w' = 0.5 (Adam's first step, lr 0.5). ℓ = (w − x)²: candidates
    x = −3, −1, 0.25, 1, 3 score ℓ(w') − ℓ(w) = 3.25, 1.25, 0, −0.75, −2.75, so −3 then −1 are replayed (x = 3 has
    the same pre-loss as −3 but is helped by the update)."""
    method = toy_method(Mir, "mir", mir={"candidates_factor": 5})
    method.buffer.add(generator=method.generators["replay"], **method.memory_fields(
        clips([-3.0, -1.0, 0.25, 1.0, 3.0]), {}))
    method.step(clips([2.0, 2.0]))
    kinds = [(k, rows, grad) for k, rows, grad, _, _ in method.backbone.calls]
    assert kinds == [("full", 5, False), ("full", 2, True), ("full", 5, False), ("full", 4, True)]
    pre, virtual, post, main = method.backbone.calls
    assert pre[3] == 0.0 and virtual[3] == 0.0 and post[3] == pytest.approx(0.5, abs=1e-6)  # scored at θ and θ'
    assert main[3] == 0.0  # trained at the restored θ
    assert feature(main[4]).tolist() == [2.0, 2.0, -3.0, -1.0]
    assert method.backbone.w.item() == 0.0 and len(method.optimizer.state) == 0


def test_gmed_edits_exactly_the_replayed_slots_by_the_formula():
    """Δ = ∇_X[L(X; w') − (1−β)L(X; w)] with L = mean_j (w − x_j)²: each video element of row j moves by
    γ·2/(B·N_V)·[(x_j − w') − (1−β)(x_j − w)] (N_A for audio); w = 0, w' = 0.5, γ 0.1, β 0.05."""
    method = toy_method(Gmed, "gmed", gmed={"gamma": 0.1, "beta": 0.05})
    stored = clips([1.0, -1.0, 0.5])
    method.buffer.add(generator=method.generators["replay"], **method.memory_fields(stored, {}))
    slots = replay_order(method, 3, 2)
    method.step(clips([2.0, 2.0]))
    x = torch.tensor([1.0, -1.0, 0.5])
    move = 2 / 2 * ((x - 0.5) - 0.95 * x)  # (3,): 2/B · [...] for every slot
    edited = torch.zeros(3, dtype=torch.bool)
    edited[slots] = True
    expected_v = stored["video"] + torch.where(edited, 0.1 * move / N_V, 0.0).view(3, 1, 1, 1, 1)
    expected_a = stored["audio"] + torch.where(edited, 0.1 * move / N_A, 0.0).view(3, 1, 1, 1)
    torch.testing.assert_close(method.buffer.fields["video"][:3], expected_v, atol=1e-7, rtol=0)
    torch.testing.assert_close(method.buffer.fields["audio"][:3], expected_a, atol=1e-7, rtol=0)
    assert torch.equal(method.buffer.fields["video"][:3][~edited], stored["video"][~edited])  # untouched slot
    main = method.backbone.calls[-1]
    assert [c[:3] for c in method.backbone.calls] == [("full", 2, True)] * 3 + [("full", 4, True)]
    torch.testing.assert_close(main[4][2:], expected_v[slots])  # the edited clips are the ones replayed
    assert method.backbone.w.item() == 0.0 and len(method.optimizer.state) == 0


@pytest.mark.parametrize("age_samples", [False, True])
def test_gmed_ages(age_samples):
    """Faithful: ages stay 0, so with decay d = 1 every replay edits again ((1−d)^0 = 1); age_samples: one edit."""
    method = toy_method(Gmed, "gmed", memory=2, gmed={"decay": 1.0, "age_samples": age_samples})
    method.buffer.add(generator=method.generators["replay"], **method.memory_fields(clips([1.0, -1.0]), {}))
    current = clips([2.0, 2.0])
    first = method.replay(current, 2)["video"].clone()
    second = method.replay(current, 2)
    assert method.buffer.fields["age"].tolist() == ([2.0, 2.0] if age_samples else [0.0, 0.0])
    assert torch.equal(torch.sort(feature(second["video"])).values, torch.sort(feature(first)).values) == age_samples


def real_method(name, B=2, memory=8, **overrides):
    torch.manual_seed(0)
    backbone = CAVMAE(resolve_model_preset(ModelConfig(preset="tiny")), 2, 32, 64, 32)
    method = METHODS[name].cls(backbone, method_cfg(name, **overrides), avm_cfg=AVMConfig(), batch_size=B,
                           memory_per_rank=memory, seed=0, rank=0, device=torch.device("cpu"))
    optimizer = build_optimizer(method, OptimConfig(lr=1e-3))
    method.attach_optimizer(optimizer, torch.amp.GradScaler("cpu", enabled=False))
    return method, optimizer


def real_batch(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(B, 2, 3, 32, 32, generator=g), "audio": torch.randn(B, 1, 64, 32, generator=g),
            "label": torch.arange(B), "task": torch.zeros(B, dtype=torch.long), "index": torch.arange(B)}


def train_step(method, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    sum(method.step(batch).values()).backward()
    optimizer.step()
    method.after_optimizer_step()


@pytest.mark.parametrize("name,options", [("mir", {}), ("gmed", {}),
                                          ("mir", {"mir": {"fix_virtual_step": True, "same_masks": True}}),
                                          ("gmed", {"gmed": {"fix_virtual_step": True}})])
def test_virtual_updates_leave_weights_and_optimiser_state_bit_for_bit(name, options):
    method, optimizer = real_method(name, **options)
    for seed in range(2):  # a populated optimiser state and buffer
        train_step(method, optimizer, real_batch(seed=seed))
    weights = copy.deepcopy(method.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    optimizer.zero_grad(set_to_none=True)
    seen = []  # the weights the scoring / editing passes ran at
    method.backbone.register_forward_pre_hook(lambda m, args: seen.append(m.patch_embed_v.proj.weight.clone()))
    method.step(real_batch(seed=2))
    assert any(not torch.equal(w, weights["backbone.patch_embed_v.proj.weight"]) for w in seen)  # θ' was used
    for key, value in method.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = optimizer.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for i, state in opt_state["state"].items():
        assert all(torch.equal(after["state"][i][k], v) for k, v in state.items()), i
    assert all(p.grad is None for p in method.parameters())  # the virtual gradient never lands in .grad


@pytest.mark.parametrize("same_masks", [False, True])
def test_mir_pre_and_post_scores_use_fresh_or_the_same_masks(same_masks):
    """With lr 0 the virtual step leaves θ' = θ, so pre and post per-sample losses differ only by their masks:
    faithful (fresh masks) they differ, with `mir.same_masks` they are equal bit for bit."""
    method, optimizer = real_method("mir", mir={"same_masks": same_masks})
    for seed in range(2):
        train_step(method, optimizer, real_batch(seed=seed))
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    scores = []
    method.backbone.register_forward_hook(lambda m, args, kwargs, out: scores.append(
        per_sample_loss(out)) if kwargs.get("reduction") == "none" else None, with_kwargs=True)
    method.step(real_batch(seed=2))
    pre, post = scores
    assert pre.shape == (4,) and torch.equal(pre, post) == same_masks


def test_fixed_virtual_step_unscales_the_gradient_and_skips_a_non_finite_one():
    """With a GradScaler (scale 2^16) the fixed step divides the scale out before Adam: at w = 1, x = 1.5 the loss
    gradient −1 and the L2 term +1 cancel (w' = w); left scaled it would be −65535 (w' = w + lr). At x = 1e34 the
    scaled gradient overflows float32: the step is skipped (w' = w; taken, it would make w NaN)."""
    inside = {}
    for x in (1.5, 1e34):
        method = toy_method(Mir, "mir", w=1.0)
        method.optimizer = torch.optim.Adam(method.parameters(), lr=0.5, betas=(0.95, 0.999), weight_decay=1.0)
        method.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        with method.virtually_updated(clips([x, x]), fix=True):
            inside[x] = method.backbone.w.item()
    assert inside == {1.5: 1.0, 1e34: 1.0}


def virtual_weight_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank r trains on x = +2 (r = 0) or −2 (r = 1); the weight inside the virtual update, faithful and fixed."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inside = {}
        for fix in (False, True):
            method = toy_method(Mir, "mir")
            with method.virtually_updated(clips([2.0 - 4 * rank] * 2), fix):
                inside[fix] = method.backbone.w.item()
        torch.save(inside, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down (a rank leaving first can abort the other)
    finally:
        dist.destroy_process_group()


def test_virtual_step_gradient_is_local_as_the_authors_or_averaged_over_ranks(tmp_path):
    """baselines.md §2.6: inside DDP's forward the authors' virtual step sees each rank's own gradient (w' = ±lr on the
    two ranks); fix_virtual_step averages it (−4 and +4 cancel: w' = 0 on both)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(virtual_weight_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r[False] for r in ranks] == pytest.approx([0.5, -0.5], abs=1e-6)
    assert [r[True] for r in ranks] == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------
# EMA teachers: CLS-ER, ESMER


def test_clser_targets_come_from_the_teacher_with_the_higher_diagonal_probability():
    """Row 0: the stable teacher pairs a0 = e0 with v0 = e0 (cos 1 against 0: P ≈ 1) while the plastic one gives
    P = 0.5; row 1: the stable teacher's v1 = −e1 opposes a1 (P ≈ 0), the plastic one ties (0.5). Both
    directions pick stable for row 0 and plastic for row 1."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    stable = (torch.stack([2 * e0, 2 * e1]), torch.stack([2 * e0, -2 * e1]))
    plastic = (torch.stack([3 * e0, 3 * e1]), torch.stack([3 * e1, 4 * e1]))
    target_a, target_v = clser_targets(stable, plastic, tau=0.05)
    assert target_a.tolist() == [[2.0, 0.0], [0.0, 3.0]]
    assert target_v.tolist() == [[2.0, 0.0], [0.0, 4.0]]


def test_clser_step_penalty_and_teacher_updates():
    method = toy_method(ClsEr, "clser", w=1.0)
    method.step(clips([1.0, 2.0]))
    draws = torch.Generator().manual_seed(4)  # the method's EMA generator (seed 0, rank 0)
    draws.set_state(method.generators["ema"].get_state())
    with torch.no_grad():
        method.backbone.w.fill_(3.0)
    losses = method.step(clips([3.0, 4.0]))
    # teachers are still at w = 1 for the targets (the EMA of step 1 averaged w = 1 with itself)
    kinds = [c[:3] for c in method.stable.calls + method.plastic.calls]
    assert kinds == [("encoder", 2, False), ("encoder", 2, False)]
    # targets = 1·x, student z = 3·x on the replayed x ∈ {1, 2}: MSE = (4 + 4 + 16 + 16) / 4 = 10 per modality
    assert losses["loss_pen"].item() == pytest.approx(0.1 * (10 + 10))
    a = 1 - 1 / 3  # global_step 2: a = min(1 − 1/(t+1), 0.999)
    for teacher, prob in ((method.plastic, 0.8), (method.stable, 0.6)):
        updated = torch.rand(1, generator=draws).item() < prob
        assert teacher.w.item() == pytest.approx(a * 1 + (1 - a) * 3 if updated else 1.0)
    counts = {"plastic": 0, "stable": 0}
    for _ in range(2000):
        before = (method.plastic.w.item(), method.stable.w.item())
        method.count_step()
        counts["plastic"] += method.plastic.w.item() != before[0]
        counts["stable"] += method.stable.w.item() != before[1]
    assert abs(counts["plastic"] / 2000 - 0.8) < 0.03 and abs(counts["stable"] / 2000 - 0.6) < 0.03


def test_clser_ema_after_step_waits_for_the_optimiser():
    method = toy_method(ClsEr, "clser", w=1.0, clser={"ema_after_step": True, "plastic_update_prob": 1.0})
    with torch.no_grad():
        method.backbone.w.fill_(3.0)
    method.step(clips([1.0, 2.0]))
    assert method.plastic.w.item() == 1.0  # not yet
    method.after_optimizer_step()
    assert method.plastic.w.item() == pytest.approx(0.5 * 1 + 0.5 * 3)  # global_step 1: a = 0.5


def test_esmer_weights_and_running_statistics():
    """margin 2.5 · μ 1.5 = 3.75: e = 3.75 is down-weighted (μ/e = 0.4) but stored, e = 10 weighted 0.15 and not
    stored. Statistics: e = [1, 2, 3, 10] has mean 4, std 4.08, so 10 is dropped; the kept [1, 2, 3] have mean
    2 and std 1, and at step 1 (a = 0.5) μ, σ move from 0 to 1.0, 0.5."""
    w, keep = esmer_weights(torch.tensor([1.0, 3.75, 10.0]), 1.5, 2.5)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.4, 0.15]))
    assert keep.tolist() == [True, True, False]
    w, keep = esmer_weights(torch.tensor([1.0, 100.0]), 0.0, 2.5)  # no statistics yet
    assert w.tolist() == [1.0, 1.0] and keep.all()
    assert running_loss_stats(torch.tensor([1.0, 2.0, 3.0, 10.0]), 0.0, 0.0, 1, 0.99, 1.0) == pytest.approx((1.0, 0.5))
    assert running_loss_stats(torch.tensor([2.0, 4.0]), 1.0, 0.5, 1000, 0.99, 1.0) == pytest.approx(
        (0.99 * 1.0 + 0.01 * 3.0, 0.99 * 0.5 + 0.01 * 2 ** 0.5))


def test_esmer_step_weights_the_current_rows_and_filters_the_buffer():
    """Teacher and student at w = 0: e = x² = [0.01, 25] with μ = 1: weights [1, 1/25], clip 2 not stored;
    loss = mean of [0.01·1, 25·0.04] over the 2 rows."""
    method = toy_method(Esmer, "esmer")
    method.loss_mean = 1.0
    losses = method.step(clips([0.1, 5.0]))
    assert losses["loss_mae_v"].item() == pytest.approx((0.01 + 1.0) / 2)
    assert len(method.buffer) == 1 and method.buffer.fields["index"][0].item() == 0
    assert [c[:3] for c in method.ema.calls] == [("full", 2, False)]  # no replay yet: no encoder-only pass
    method.step(clips([1.0, 1.0]))
    assert [c[:3] for c in method.ema.calls[1:]] == [("full", 2, False), ("encoder", 1, False)]
    assert [c[:3] for c in method.backbone.calls] == [("full", 2, True), ("full", 3, True)]


def test_esmer_weights_only_the_current_rows_and_averages_over_current_and_replayed():
    """Buffer: the clip x = 0.1. Step on x = [1, 4] with μ = 1: teacher losses e = [1, 16], weights [1, 1/16]; the
    replayed row keeps weight 1; the student's rows [1, 4, 0.1] have ℓ = x² = [1, 16, 0.01], so
    L_mae_v = (1·1 + 16/16 + 0.01·1) / 3 = 2.01 / 3."""
    method = toy_method(Esmer, "esmer")
    method.loss_mean = 1.0
    method.step(clips([0.1, 5.0]))  # stores only x = 0.1 (25 > 2.5·μ)
    method.loss_mean = 1.0
    losses = method.step(clips([1.0, 4.0]))
    assert [c[:3] for c in method.backbone.calls[1:]] == [("full", 3, True)]
    assert losses["loss_mae_v"].item() == pytest.approx(2.01 / 3)


# ----------------------------------------------------------------------------------------------------------
# passes per step on the real backbone


PASSES = {  # (module, rows, grad enabled, decoder ran) of the third step (buffer of 4 clips), B = 2
    "er": [("backbone", 4, True, True)],
    "derpp": [("backbone", 4, True, True)],
    "lump": [("backbone", 2, True, True)],
    "mir": [("backbone", 4, False, True), ("backbone", 2, True, True), ("backbone", 4, False, True),
            ("backbone", 4, True, True)],
    "gmed": [("backbone", 2, True, True)] * 3 + [("backbone", 4, True, True)],
    "clser": [("stable", 2, False, False), ("plastic", 2, False, False), ("backbone", 4, True, True)],
    "esmer": [("ema", 2, False, True), ("ema", 2, False, False), ("backbone", 4, True, True)],
}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_passes_per_step(name):
    """Methods that need extra passes run them, the others do not (baselines.md §5's cost table)."""
    method, optimizer = real_method(name)
    for seed in range(2):
        train_step(method, optimizer, real_batch(seed=seed))
    calls = []
    for module in ("backbone", "stable", "plastic", "ema"):
        if hasattr(method, module):
            model = getattr(method, module)
            model.patch_embed_v.register_forward_hook(lambda m, i, out, module=module: calls.append(
                [module, out.shape[0], torch.is_grad_enabled(), False]))
            model.decoder_embed.register_forward_hook(lambda m, i, out: calls[-1].__setitem__(3, True))
    method.step(real_batch(seed=2))
    assert [tuple(c) for c in calls] == PASSES[name]


# ----------------------------------------------------------------------------------------------------------
# defaults and recipes


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# baselines.md §3: per dataset, what each method's recipe sets (everything else inherited from the stream's base);
# one memory size for every method of a table (README "Where each value comes from")
PER_DATASET = {
    "vggsound": {"memory": 2000, "batch": 48, "epochs": 10, "lump": 0.1, "gmed_beta": 0.05, "temperature": 0.4,
                 "candidates_per_gpu": 60},
    "audioset": {"memory": 5000, "batch": 36, "epochs": 15, "lump": 0.05, "gmed_beta": 0.01, "temperature": 0.1,
                 "candidates_per_gpu": 45},
}
METHOD_NAMES = {"multitask": "multitask", "finetune": "finetune", "er": "er", "mir": "mir", "derpp": "derpp",
                "gmed": "gmed", "clser": "clser", "esmer": "esmer", "lump": "lump", "stella": "stella",
                "stella_plus": "stella+"}


def test_method_defaults_are_the_authors_vggsound_values():
    m = MethodConfig()
    assert m.alpha == 0.5 and m.lump.mixup_alpha == 0.1 and m.mir.candidates_factor == 5
    assert (m.gmed.gamma, m.gmed.beta, m.gmed.decay) == (0.1, 0.05, 1.0)
    c = m.clser
    assert (c.reg_weight, c.plastic_update_prob, c.plastic_alpha, c.stable_update_prob, c.stable_alpha) == \
        (0.1, 0.8, 0.999, 0.6, 0.999)
    e = m.esmer
    assert (e.reg_weight, e.ema_update_prob, e.ema_alpha, e.loss_margin, e.loss_alpha, e.std_margin) == \
        (0.15, 0.2, 0.999, 2.5, 0.99, 1.0)
    faithful = (m.mir.same_masks, m.mir.fix_virtual_step, m.gmed.age_samples, m.gmed.fix_virtual_step,
                c.ema_after_step, e.ema_after_step)
    assert not any(faithful)


def test_every_recipe_loads_and_per_dataset_recipes_carry_the_authors_values():
    for path in sorted(RECIPES.glob("*.yaml")):
        recipe = load_recipe(path)  # raises on any unknown key or bad value
        chain = path.stem in ("init_synthetic_heldout", "init_avm_synthetic")  # cached beside the data it came from
        assert recipe.output.dir.startswith("data/synthetic/init/" if chain else "runs/"), path.name
    for method, name in METHOD_NAMES.items():
        synthetic = load_recipe(RECIPES / f"synthetic_{method}.yaml")
        assert synthetic.method.name == name and synthetic.output.dir == f"runs/synthetic_{method}"
        # Multitask: as many clips as a replay method trains on (B new + B replayed per step), 2 x 10 over the union
        epochs = 20 if method == "multitask" else 10
        assert (synthetic.train.epochs, synthetic.train.batch_size, synthetic.method.memory_size) == (epochs, 16, 200)
        for dataset, v in PER_DATASET.items():
            r = load_recipe(RECIPES / f"{dataset}_{method}.yaml")
            assert r.method.name == name and r.output.dir == f"runs/{dataset}_{method}"
            assert r.data.dataset == dataset and (r.train.epochs, r.train.batch_size) == (v["epochs"], v["batch"])
            assert r.method.memory_size == v["memory"]
            assert r.method.lump.mixup_alpha == v["lump"] or method != "lump"
            assert r.method.gmed.beta == v["gmed_beta"] or method != "gmed"
            assert r.method.stella.att_temperature == v["temperature"] or method not in ("stella", "stella_plus")
            per_gpu = r.train.batch_size // 4  # the paper's 4 GPUs
            assert r.method.mir.candidates_factor * per_gpu == v["candidates_per_gpu"] or method != "mir"
