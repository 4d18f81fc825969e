"""The paper's replay baselines as the authors ran them (baselines.md §2.3-2.9): ER, DER++, LUMP, MIR, GMED,
CLS-ER, ESMER.

All share "concat-replay" (baselines.md §1.4-1.5), written once in `ER` on the memory of methods.Replay: B_m
stored rows (augmented full clips) are concatenated after the B current rows, one MAE + contrastive loss runs on
the joint batch, and the current clips are offered to the memory after the forward. Each subclass shows only what
makes it that method: which rows are replayed (`replay`: MIR picks, GMED edits), what penalty they carry
(`penalty`: DER++, CLS-ER), what a slot stores (`memory_fields`), or a step of its own (LUMP, ESMER). Authors'
quirks are the defaults; their fixes are the `method.<name>.*` options of method.md §9.3.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_cli.config import MethodConfig
from stella_cli.distributed import average_over_ranks
from stella_cli.methods import Replay, clip_ids
from stella_cli.model import CAVMAE

LOSS_KEYS = ("loss_mae_a", "loss_mae_v", "loss_con")


def per_sample_loss(out: dict[str, Tensor]) -> Tensor:
    """ℓ_i = MAE_a,i + MAE_v,i + λ_c·NCE_i of a reduction="none" pass (baselines.md §1.1). (N,)"""
    return sum(out[k] for k in LOSS_KEYS)


def consistency(weight: float, z_a: Tensor, z_v: Tensor, target_a: Tensor, target_v: Tensor) -> Tensor:
    """weight·[MSE(z_a, target_a) + MSE(z_v, target_v)], each the mean over N×D elements (DER++, CLS-ER, ESMER)."""
    return weight * (F.mse_loss(z_a, target_a.detach()) + F.mse_loss(z_v, target_v.detach()))


def frozen_copy(backbone: nn.Module) -> nn.Module:
    """A teacher: a copy of the backbone as it is now (the initial weights), outside the optimiser."""
    return copy.deepcopy(backbone).requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, alpha: float) -> None:
    """θ_T ← a·θ_T + (1−a)·θ with a = min(1 − 1/(t+1), alpha) (clser.py / esmer.py)."""
    a = min(1 - 1 / (step + 1), alpha)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(a).add_(s, alpha=1 - a)


@torch.no_grad()
def virtual_adam_step(optimizer: torch.optim.Optimizer, grads: list[Tensor | None]) -> None:
    """One Adam step on the parameters that reads but never writes m, v or the step count (the authors'
    `step_wo_state_update_adam`, baselines.md §2.6): m' = β1·m + (1−β1)g, v' = β2·v + (1−β2)g² with g including the L2
    weight decay, θ ← θ − lr·√(1−β2^{s+1})/(1−β1^{s+1})·m'/(√v' + ε).  grads: one per parameter, in group order."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"virtual_adam_step: expected torch.optim.Adam, got {type(optimizer).__name__}")
    flat = iter(grads)
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            g = next(flat)
            if g is None:
                continue
            if group["weight_decay"]:
                g = g.add(p, alpha=group["weight_decay"])
            state = optimizer.state.get(p, {})  # .get: never creates an entry
            s = float(state.get("step", 0))
            m = state["exp_avg"] * beta1 + (1 - beta1) * g if "exp_avg" in state else (1 - beta1) * g
            v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g if "exp_avg_sq" in state else (1 - beta2) * g * g
            size = float(group["lr"]) * math.sqrt(1 - beta2 ** (s + 1)) / (1 - beta1 ** (s + 1))
            p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-size)


# ----------------------------------------------------------------------------------------------------------
# concat-replay


class ER(Replay):
    """ER (baselines.md §2.3): L_base([X_t; X_m]), one fwd+bwd on 2B rows (B at the first step). The base of
    the others."""

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        B, n = batch["video"].shape[0], self.replay_size(self.replay_batch)
        replay = self.replay(batch, n) if n else None
        audio, video = joint_inputs(batch, replay)  # (B + B_m, ...) current rows first
        out = self.backbone(audio, video, generator=self.generators["mask"])
        losses = self.backbone_losses(out)
        if replay is not None:
            losses.update(self.penalty(out["z_a"][B:], out["z_v"][B:], replay))
        self.remember(self.memory_fields(batch, out))
        return losses

    def replay(self, batch: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        """X_m: n stored rows (B_m for a whole step), uniform without replacement (baselines.md §1.4)."""
        return self.sample(n, batch["video"].device)

    def penalty(self, z_a: Tensor, z_v: Tensor, replay: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra loss terms on the replayed rows' pooled embeddings (B_m, D); ER has none."""
        return {}

    def memory_fields(self, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a slot keeps of each current clip: the augmented clip (+ ids for `stella buffer` only)."""
        return dict(video=batch["video"], audio=batch["audio"], **clip_ids(batch))


def joint_inputs(batch: dict[str, Tensor], replay: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
    """(audio, video) of [X_t; X_m] (baselines.md §1.5), or of X_t alone."""
    if replay is None:
        return batch["audio"], batch["video"]
    return torch.cat([batch["audio"], replay["audio"]]), torch.cat([batch["video"], replay["video"]])


class DERpp(ER):
    """DER++ (baselines.md §2.4): + α·[MSE(z_a(X_m), z_a^stored) + MSE(z_v(X_m), z_v^stored)], α = `method.alpha` 0.5.

    The stored targets are the pooled embeddings of the training forward in which the clip was current."""

    def penalty(self, z_a: Tensor, z_v: Tensor, replay: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loss_pen": consistency(self.cfg.alpha, z_a, z_v, replay["z_a"], replay["z_v"])}

    def memory_fields(self, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        B = batch["video"].shape[0]
        return {**super().memory_fields(batch, out), "z_a": out["z_a"][:B].detach(), "z_v": out["z_v"][:B].detach()}


class Lump(ER):
    """LUMP (baselines.md §2.5): train only on X̃ = λ·X_t + (1−λ)·X_m, one λ ~ Beta(a, a) per batch for both modalities;
    one fwd+bwd on B rows; the un-mixed X_t is stored. a = `method.lump.mixup_alpha`."""

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        self.mix_rng = np.random.default_rng(kwargs["seed"] * 1000 + kwargs["rank"] + 5)  # λ, as np.random.beta
        self.step_lam: float | None = None  # λ of the optimiser step in progress

    def end_step(self) -> None:
        self.step_lam = None
        super().end_step()

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        audio, video = batch["audio"], batch["video"]
        n = self.replay_size(self.step_rows or video.shape[0])  # a partner per current clip (R = B)
        if n:
            replay = self.sample(n, video.device)  # row i is mixed with replay row i ...
            pair = torch.arange(video.shape[0], device=video.device) % n  # ... mod R
            replay = {k: v[pair] for k, v in replay.items()}  # (the authors' code crashes with R < B)
            if self.whole_step or self.step_lam is None:  # one λ per optimiser step, shared by its micro-batches
                self.step_lam = float(self.mix_rng.beta(self.cfg.lump.mixup_alpha, self.cfg.lump.mixup_alpha))
            lam = self.step_lam
            audio, video = lam * audio + (1 - lam) * replay["audio"], lam * video + (1 - lam) * replay["video"]
        out = self.backbone(audio, video, generator=self.generators["mask"])
        self.remember(self.memory_fields(batch, out))  # the clean clips
        return self.backbone_losses(out)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "mix_rng": self.mix_rng.bit_generator.state}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.mix_rng.bit_generator.state = state["mix_rng"]


class VirtualUpdate(ER):
    """MIR and GMED look at the loss after a virtual optimiser step on X_t (baselines.md §2.6 step 4)."""

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        self.optimizer: torch.optim.Optimizer | None = None  # set by attach_optimizer (train.py)
        self.scaler: torch.amp.GradScaler | None = None

    @contextmanager
    def virtually_updated(self, batch: dict[str, Tensor], fix: bool) -> Iterator[None]:
        """Inside: θ' = θ after one state-free Adam step on L_base(X_t). On exit θ is restored bit for bit; the
        optimiser state and the parameters' .grad are never touched (gradients via autograd.grad).

        fix=False as the authors: the local gradient of the unscaled loss. fix=True: the loss is scaled like the
        real step (GradScaler, fp16), unscaled before the step (skipped if not finite), and averaged over ranks."""
        if self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__} needs the optimiser: call attach_optimizer first")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = [p.detach().clone() for p in params]
        try:
            out = self.backbone(batch["audio"], batch["video"], generator=self.generators["mask"])
            loss = sum(self.backbone_losses(out).values())
            scale = self.scaler.get_scale() if fix and self.scaler is not None and self.scaler.is_enabled() else 1.0
            grads = [g if g is None else g / scale
                     for g in torch.autograd.grad(loss * scale, params, allow_unused=True)]
            finite = True
            if fix:
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
                average_over_ranks(grads)
                finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            if finite:
                virtual_adam_step(self.optimizer, grads)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)


class Mir(VirtualUpdate):
    """MIR (baselines.md §2.6): of C = factor·B_m candidates, replay the B_m whose loss rises most after a virtual step:
    s_i = ℓ_i(θ') − ℓ_i(θ). Passes: 2 no-grad on C rows, 1 fwd+bwd on B (virtual), 1 fwd+bwd on 2B. A micro-batch
    scores and replays its share of them, after a virtual step on its own clips."""

    def replay(self, batch: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        c, g, stored = self.cfg.mir, self.generators["mask"], len(self.buffer)
        # C = min(factor·B_m, stored) candidates per step: this call's n rows to replay plus its share of the other
        # C − N, so each micro-batch scores at least the n it replays and the step scores C (5·n each, once full)
        others = min(c.candidates_factor * self.replay_batch, stored) - min(self.replay_batch, stored)
        cand = self.sample(n + self.share(others), batch["video"].device)
        masks = g.get_state()
        with torch.no_grad():
            pre = per_sample_loss(self.backbone(cand["audio"], cand["video"], reduction="none", generator=g))
        with self.virtually_updated(batch, c.fix_virtual_step), torch.no_grad():
            # faithful: fresh masks for the post scores (baselines.md §7.4); same_masks: the pre pass's masks again
            post_g = torch.Generator(device=g.device).set_state(masks) if c.same_masks else g
            post = per_sample_loss(self.backbone(cand["audio"], cand["video"], reduction="none", generator=post_g))
        top = torch.sort(post - pre, descending=True, stable=True).indices[:n]  # (n,)
        return {k: v[top] for k, v in cand.items()}


class Gmed(VirtualUpdate):
    """GMED (baselines.md §2.7): edit X_m ← X_m + γ·(1−d)^age·∇_X[L(X_m; θ') − (1−β)·L(X_m; θ)] (mean losses, θ' after a
    virtual step), write the edited clips back to their slots, then replay them.

    Faithful: ages never grow (baselines.md §7.3), so every replay edits the clip again whatever d;
    age_samples=True ages a slot by one per edit (d = 1 then allows one edit, as the original GMED)."""

    def replay(self, batch: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        c = self.cfg.gmed
        rows, slots = self.sample(n, batch["video"].device, return_indices=True)
        x = (rows["video"].requires_grad_(True), rows["audio"].requires_grad_(True))
        g_pre = self.input_grads(*x)  # ∇_X L(X_m; θ)
        with self.virtually_updated(batch, c.fix_virtual_step):
            g_post = self.input_grads(*x)  # ∇_X L(X_m; θ')
        stride = c.gamma * (1 - c.decay) ** rows["age"]  # (B_m,)
        video, audio = ((xi + stride.view(-1, *[1] * (xi.dim() - 1)) * (b - (1 - c.beta) * a)).detach()
                        for xi, a, b in zip(x, g_pre, g_post))
        age = rows["age"] + 1 if c.age_samples else rows["age"]
        self.buffer.update(slots, video=video, audio=audio, age=age)
        return {**rows, "video": video, "audio": audio, "age": age}

    def input_grads(self, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        out = self.backbone(audio, video, generator=self.generators["mask"])
        return torch.autograd.grad(sum(self.backbone_losses(out).values()), (video, audio))

    def memory_fields(self, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**super().memory_fields(batch, out), "age": torch.zeros(batch["video"].shape[0])}


# ----------------------------------------------------------------------------------------------------------
# EMA teachers


class Teachers(ER):
    """CLS-ER and ESMER: EMA copies of the backbone (in the checkpoint as parameters, never optimised), updated
    with a probability per step; `global_step` counts optimiser steps (not micro-batches). Faithful: the update runs
    after the step's forward, before the optimiser step (baselines.md §7.5); `ema_after_step` moves it after the
    optimiser step."""

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        # the same draws on every rank: DDP keeps the backbones equal, so the teachers stay equal too (and rank 0's
        # checkpoint restores every rank); the authors' unseeded workers draw per rank and their teachers drift apart
        self.generators["ema"] = torch.Generator().manual_seed(kwargs["seed"] * 1000 + 4)
        self.global_step = 0

    def teachers(self) -> list[tuple[nn.Module, float, float]]:
        """(teacher, update probability, alpha cap), in the authors' draw order."""
        raise NotImplementedError

    def ema_after_step(self) -> bool:
        """The method's `ema_after_step` option."""
        raise NotImplementedError

    def update_teachers(self) -> None:
        for teacher, prob, alpha in self.teachers():
            if torch.rand(1, generator=self.generators["ema"]).item() < prob:
                ema_update(teacher, self.backbone, self.global_step, alpha)

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        losses = self.train_on(batch)
        if self.whole_step:
            self.count_step()
        return losses

    def train_on(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The method's forward on (a micro-batch of) the step's clips."""
        return super().step(batch)

    def count_step(self) -> None:
        """Once per optimiser step, after its forward: count it, and update the teachers (faithful)."""
        self.global_step += 1
        if not self.ema_after_step():
            self.update_teachers()

    def end_step(self) -> None:
        super().end_step()  # the step's clips into the memory first, as in a whole step
        self.count_step()

    def after_optimizer_step(self) -> None:
        if self.ema_after_step():
            self.update_teachers()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "global_step": self.global_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.global_step = state["global_step"]


def clser_targets(stable: tuple[Tensor, Tensor], plastic: tuple[Tensor, Tensor],
                  tau: float) -> tuple[Tensor, Tensor]:
    """Per replay row, the teacher that matches the pair better (baselines.md §2.8 steps 3-4).

    stable, plastic: (z_a, z_v), each (N, D). P_av = softmax_j(cos(z_a,i, z_v,j)/τ) picks the video target,
    P_va = softmax_j(cos(z_v,i, z_a,j)/τ) the audio target; the stable teacher wins a row when its diagonal
    probability is strictly higher. -> (target_a, target_v), each (N, D).
    """
    def diagonals(z_a: Tensor, z_v: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.normalize(z_a, dim=-1) @ F.normalize(z_v, dim=-1).T / tau  # (N, N)
        return logits.softmax(1).diagonal(), logits.T.softmax(1).diagonal()  # P_av[i,i], P_va[i,i]

    (s_av, s_va), (p_av, p_va) = diagonals(*stable), diagonals(*plastic)
    target_v = torch.where((s_av > p_av)[:, None], stable[1], plastic[1])
    target_a = torch.where((s_va > p_va)[:, None], stable[0], plastic[0])
    return target_a, target_v


class ClsEr(Teachers):
    """CLS-ER (baselines.md §2.8): a plastic and a stable EMA teacher (update probability 0.8 / 0.6, a ≤ 0.999) embed
    X_m with an encoder-only pass; each row's target comes from the teacher with the higher diagonal contrastive
    probability; + r·[MSE_a + MSE_v] to the targets, r = 0.1. The working backbone is evaluated (as the authors)."""

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        self.plastic, self.stable = frozen_copy(backbone), frozen_copy(backbone)

    def teachers(self) -> list[tuple[nn.Module, float, float]]:
        c = self.cfg.clser
        return [(self.plastic, c.plastic_update_prob, c.plastic_alpha),
                (self.stable, c.stable_update_prob, c.stable_alpha)]

    def ema_after_step(self) -> bool:
        return self.cfg.clser.ema_after_step

    def replay(self, batch: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        rows, g = super().replay(batch, n), self.generators["mask"]
        with torch.no_grad():
            stable = self.stable.encode_pooled(rows["audio"], rows["video"], generator=g)
            plastic = self.plastic.encode_pooled(rows["audio"], rows["video"], generator=g)
        target_a, target_v = clser_targets(stable, plastic, self.cfg.clser.temperature)
        return {**rows, "target_a": target_a, "target_v": target_v}

    def penalty(self, z_a: Tensor, z_v: Tensor, replay: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loss_pen": consistency(self.cfg.clser.reg_weight, z_a, z_v, replay["target_a"], replay["target_v"])}


def esmer_weights(e: Tensor, running_mean: float, margin: float) -> tuple[Tensor, Tensor]:
    """baselines.md §2.9 step 2: w_i = μ/e_i where e_i ≥ margin·μ, else 1; clip i is kept for the buffer unless
    e_i > margin·μ. Before the first statistics (μ = 0) every weight is 1 and every clip kept. -> (B,), (B,) bool"""
    if running_mean <= 0:
        return torch.ones_like(e), torch.ones_like(e, dtype=torch.bool)
    w = torch.where(e >= margin * running_mean, running_mean / e, torch.ones_like(e))
    return w, ~(e > margin * running_mean)


def running_loss_stats(e: Tensor, mean: float, std: float, step: int, alpha: float,
                       std_margin: float) -> tuple[float, float]:
    """baselines.md §2.9 step 6: drop losses above mean(e) + k·std(e), then EMA of the kept losses' mean and std with
    rate a = min(1 − 1/(t+1), alpha). -> (mean, std)"""
    kept = e[~(e > e.mean() + std_margin * e.std())]
    a = min(1 - 1 / (step + 1), alpha)
    return a * mean + (1 - a) * float(kept.mean()), a * std + (1 - a) * float(kept.std())


class Esmer(Teachers):
    """ESMER (baselines.md §2.9): an EMA teacher's per-sample loss e on X_t down-weights clips with e ≥ 2.5·μ (weight
    μ/e) and keeps clips with e > 2.5·μ out of the buffer; + r·[MSE_a + MSE_v] of X_m to the teacher's
    encoder-only embeddings, r = 0.15. Passes: no-grad full (B), encoder-only (B_m), fwd+bwd (2B)."""

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        self.ema = frozen_copy(backbone)
        self.loss_mean, self.loss_std = 0.0, 0.0  # μ, σ of the teacher's per-sample loss
        self.step_losses: list[Tensor] = []  # e of the step's micro-batches, for the statistics at its end

    def teachers(self) -> list[tuple[nn.Module, float, float]]:
        return [(self.ema, self.cfg.esmer.ema_update_prob, self.cfg.esmer.ema_alpha)]

    def ema_after_step(self) -> bool:
        return self.cfg.esmer.ema_after_step

    def train_on(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        c, g, B = self.cfg.esmer, self.generators["mask"], batch["video"].shape[0]
        with torch.no_grad():
            e = per_sample_loss(self.ema(batch["audio"], batch["video"], reduction="none", generator=g)).float()
        weight, keep = esmer_weights(e, self.loss_mean, c.loss_margin)  # (B,), (B,)
        n = self.replay_size(self.replay_batch)
        replay = self.replay(batch, n) if n else None
        if replay is not None:
            with torch.no_grad():
                target_a, target_v = self.ema.encode_pooled(replay["audio"], replay["video"], generator=g)
        out = self.backbone(*joint_inputs(batch, replay), reduction="none", generator=g)
        w = torch.cat([weight, weight.new_ones(out["z_a"].shape[0] - B)])  # replayed rows keep weight 1
        losses = {k: (out[k] * w).mean() for k in LOSS_KEYS}
        if replay is not None:
            losses["loss_pen"] = consistency(c.reg_weight, out["z_a"][B:], out["z_v"][B:], target_a, target_v)
        self.remember(self.memory_fields(batch, out), keep=keep)
        self.step_losses.append(e)
        return losses

    def count_step(self) -> None:
        """… and the running statistics of the teacher's losses on every clip of the step (baselines.md §2.9)."""
        super().count_step()
        e, self.step_losses = torch.cat(self.step_losses), []
        c = self.cfg.esmer
        self.loss_mean, self.loss_std = running_loss_stats(e, self.loss_mean, self.loss_std, self.global_step,
                                                           c.loss_alpha, c.std_margin)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "loss_mean": self.loss_mean, "loss_std": self.loss_std}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.loss_mean, self.loss_std = state["loss_mean"], state["loss_std"]
