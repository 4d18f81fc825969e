"""Continual-learning methods. Each one turns a batch into a dict of named losses that train.py sums.

A method is an nn.Module (so DDP can wrap it) holding the backbone and whatever the method adds (the AVM, the
replay buffer). `step(batch)` = `forward(batch)` returns {"loss_*": scalar}; train.py sums every value, runs
backward, the AMP scaler and the optimiser step. Methods never see a task id during training (task-free protocol,
baselines_spec §1.3): `begin_task` / `end_task` exist for bookkeeping only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_cli.config import AVMConfig, MethodConfig, num_core_tokens
from stella_cli.model import (AVM, CAVMAE, audio_patches, frozen_autocast, load_avm_checkpoint, matching_loss,
                              video_patches)
from stella_cli.replay import ReservoirBuffer
from stella_cli.scoring import candidates, correlation_probs, patch_importance, query_prototypes
from stella_cli.select import (PlusSelection, first_iteration_order, gather_patches, prune_mask, select_audio_chunks,
                               select_plus_current, select_video_patches, select_video_patches_plus,
                               uniform_importance)


class Method(nn.Module):
    """Common state: the backbone and one torch.Generator per concern, seeded from (seed, rank) (STYLE §9)."""

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, *, avm_cfg: AVMConfig, batch_size: int,
                 memory_per_rank: int, seed: int, rank: int, device: torch.device):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.avm_cfg = avm_cfg
        self.batch_size = batch_size  # per-rank current clips per step
        self.memory_per_rank = memory_per_rank
        base = seed * 1000 + rank
        self.generators = {
            "mask": torch.Generator(device=device).manual_seed(base + 1),  # MAE visibility, matching negatives
            "select": torch.Generator(device=device).manual_seed(base + 2),  # pruning, multinomial, chunk sides
            "replay": torch.Generator().manual_seed(base + 3),  # reservoir slots and replay sampling (CPU)
        }
        self.non_finite: dict[str, Tensor] = {}  # name -> 0-d bool, read by train.py's divergence guard

    def check_finite(self, name: str, x: Tensor, fill: float | None = None) -> Tensor:
        """Flag non-finite values of an intermediate `name` for train.py's divergence guard (which reports them with
        the step and the loss terms), without a device sync. With `fill`, every row (first dim) holding one is
        replaced by `fill`, so the sampling that follows (torch.bernoulli / multinomial, which raise on NaN) runs
        and the step reaches the guard; finite rows are returned unchanged (bit-identical)."""
        ok = torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)  # (B,)
        self.non_finite[name] = ~ok.all()
        if fill is None:
            return x
        return torch.where(ok.reshape(-1, *[1] * (x.dim() - 1)), x, torch.full_like(x, fill))

    def pop_non_finite(self) -> dict[str, Tensor]:
        """The flags of the last forward, cleared for the next one."""
        flags, self.non_finite = self.non_finite, {}
        return flags

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.step(batch)

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def begin_task(self, task: str) -> None:
        """Task-free methods ignore boundaries; kept so task-aware baselines can hook in."""

    def end_task(self, task: str) -> None:
        """See begin_task."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """train.py hands over the optimiser and the AMP scaler (MIR and GMED take a virtual step with them)."""
        self.optimizer, self.scaler = optimizer, scaler

    def after_optimizer_step(self) -> None:
        """Called by train.py after each optimiser step (the CLS-ER / ESMER `ema_after_step` fix)."""

    def extra_state(self) -> dict[str, Any]:
        """Everything a checkpoint needs beyond parameters: generator states, buffers."""
        return {"generators": {k: g.get_state() for k, g in self.generators.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])

    def backbone_losses(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: out[k] for k in ("loss_mae_a", "loss_mae_v", "loss_con")}


class Finetune(Method):
    """Sequential MAE + contrastive training with no memory (baselines_spec §0). Multitask = this on the union."""

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.backbone(batch["audio"], batch["video"], generator=self.generators["mask"])
        return self.backbone_losses(out)


def build_avm(backbone: CAVMAE, cfg: AVMConfig) -> AVM:
    """The AVM for this backbone; from model.avm.checkpoint if set (spec §2.5), else random as the authors' (B2)."""
    avm = AVM(backbone.embed_dim, backbone.num_heads, fix_head_reshape=cfg.fix_head_reshape)
    if cfg.checkpoint:
        load_avm_checkpoint(avm, cfg.checkpoint)
    return avm


class AVMPretrain(Method):
    """AVM pre-training on a frozen backbone (stella_spec §2.5, the authors' Finetune_submodule).

    The backbone takes no gradient (requires_grad off, so the optimiser holds only the AVM) and runs under no_grad
    for the unimodal and the joint pass; the only loss is STELLA's L_vam (model.matching_loss: ⌊B/2⌋ positives,
    deranged negatives), weighted by method.stella.matching_loss_weight (the authors' cl_algo matching weight 1.0).
    """

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        self.backbone.requires_grad_(False)
        self.avm = build_avm(backbone, self.avm_cfg)

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            c_a, c_v = self.backbone.unimodal_codes(batch["audio"], batch["video"])  # (B, L_A, D), (B, L_V, D)
        loss = matching_loss(self.backbone, self.avm, c_a, c_v, self.generators["mask"])
        return {"loss_vam": self.cfg.stella.matching_loss_weight * loss}


class Stella(Method):
    """STELLA (stella_spec §3): AVM-guided localized patch selection + replay with a DER-style penalty.

    One iteration is steps A-I of the spec, in that order. The RCA and the matching loss use the AVM weights from
    before this iteration's update; the buffer is written after the forward.
    """

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        s = cfg.stella
        # Patch-selection ablations (baselines_spec §2.13, README "Ablations"): without RCA p ≡ 0; without importance
        # the choice is uniform among the unpruned patches. `random` uses neither, so it has no AVM at all: no frozen
        # scoring passes, no matching loss, no AVM parameters (DDP would otherwise wait for their gradients).
        self.uses_rca = s.selection in ("full", "correlation")
        self.uses_importance = s.selection in ("full", "importance")
        self.avm = None
        if s.selection != "random":
            self.avm = build_avm(backbone, self.avm_cfg)
        self.K_V = num_core_tokens(backbone.num_video_tokens, s.core_video_ratio)
        self.K_A = num_core_tokens(backbone.num_audio_tokens, s.core_audio_ratio)
        self.replay_batch = cfg.replay_batch_size or self.batch_size
        self.buffer = ReservoirBuffer(self.memory_per_rank)

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        video, audio = batch["video"], batch["audio"]  # (B, F, 3, S, S), (B, 1, T, M)
        B = video.shape[0]
        scores = self.score(audio, video) if self.avm is not None else self.uniform_scores(B, video.device)  # A-D
        replay = None if len(self.buffer) == 0 else self.sample_replay(video.device)
        core = self.select(audio, video, scores, replay)  # steps E-F
        # Step G (spec §3.7): MAE + contrastive on the core patches with modality-guided masking
        out = self.backbone(core["audio"], core["video"], ids_a=core["order_a"], ids_v=core["order_v"],
                            generator=self.generators["mask"])
        losses = self.backbone_losses(out)
        if self.avm is not None:
            losses["loss_vam"] = scores["loss_vam"]
        # Step H (spec §3.8): DER-style penalty on the replayed clips' stored pooled embeddings
        if replay is not None:
            losses["loss_pen"] = self.cfg.alpha * (F.mse_loss(out["z_a"][B:], replay["z_a"])
                                                   + F.mse_loss(out["z_v"][B:], replay["z_v"]))
        # Step I (spec §3.9): offer every current clip to the reservoir
        fields = self.memory_fields(batch, scores, core, out)
        self.buffer.add(generator=self.generators["replay"], **{k: v for k, v in fields.items() if v is not None})
        return losses

    def score(self, audio: Tensor, video: Tensor) -> dict[str, Any]:
        """Steps A-D: frozen codes, patch importance, the AVM's matching loss, query prototypes."""
        s = self.cfg.stella
        # Step A (spec §3.1): frozen unimodal codes, no masking, no graph
        with torch.no_grad():
            with frozen_autocast(audio.device, s.frozen_bf16):  # default off: fp32 (or the step's AMP)
                c_a, c_v = self.backbone.unimodal_codes(audio, video)  # (B, L_A, D), (B, L_V, D)
                # Step B (spec §3.2): localized patch importance from the AVM's attention logits
                e_a, e_v = self.backbone.joint_codes(c_a, c_v)
            if s.frozen_bf16:
                c_a, c_v, e_a, e_v = c_a.float(), c_v.float(), e_a.float(), e_v.float()
            att = self.avm.attention_logits(e_a, e_v)
        self.check_finite("AVM logits S_av", att["S_av"])
        self.check_finite("AVM logits S_va", att["S_va"])
        # a diverged row becomes uniform importance, so the multinomial draws below still run (the guard stops)
        I_v = self.check_finite("importance I_v", patch_importance(att["S_av"], s.att_temperature),
                                1 / att["S_av"].shape[-1])  # (B, L_V)
        I_a = self.check_finite("importance I_a", patch_importance(att["S_va"], s.att_temperature),
                                1 / att["S_va"].shape[-1])  # (B, L_A)
        C_v, C_a = candidates(I_v, self.K_V), candidates(I_a, self.K_A)  # (B, K_V), (B, K_A)
        # Step C (spec §3.3): train the AVM on the current clips, backbone frozen
        loss_vam = s.matching_loss_weight * matching_loss(self.backbone, self.avm, c_a, c_v, self.generators["mask"],
                                                          joint=(e_a, e_v), frozen_bf16=s.frozen_bf16)
        # Step D (spec §3.4): importance-weighted query prototypes
        q_bar_v = query_prototypes(att["q_v"], I_v, C_v)  # (B, H, d_h)
        q_bar_a = query_prototypes(att["q_a"], I_a, C_a)  # (B, H, d_h)
        return dict(att=att, I_v=I_v, I_a=I_a, C_v=C_v, C_a=C_a, q_bar_v=q_bar_v, q_bar_a=q_bar_a, loss_vam=loss_vam,
                    scale=att["q_v"].shape[-1] ** -0.5)

    def uniform_scores(self, B: int, device: torch.device) -> dict[str, Any]:
        """The `random` ablation's stand-in for steps A-D: I = 1/L for every patch, no prototypes, no AVM loss."""
        return dict(I_v=uniform_importance(B, self.backbone.num_video_tokens, device),
                    I_a=uniform_importance(B, self.backbone.num_audio_tokens, device), q_bar_v=None, q_bar_a=None)

    def select(self, audio: Tensor, video: Tensor, sc: dict[str, Any], replay: dict[str, Tensor] | None) -> dict:
        """Steps E-F: core patches and orderings of the current clips, then the replayed ones (2B rows)."""
        g, p = self.generators["select"], self.backbone.patch_size
        if replay is None and self.uses_importance:  # first iteration (spec §9.3 B9): top-K, no chunking, p = 0
            p_v, p_a = torch.zeros_like(sc["I_v"]), torch.zeros_like(sc["I_a"])
            order_v, order_a = first_iteration_order(sc["I_v"], self.K_V), first_iteration_order(sc["I_a"], self.K_A)
        else:
            I_v, I_a = sc["I_v"], sc["I_a"]  # (B, L_V), (B, L_A)
            p_v, p_a = torch.zeros_like(I_v), torch.zeros_like(I_a)  # no RCA: nothing is pruned
            if replay is not None and self.uses_rca:
                # Step E (spec §3.5): replay-guided correlation; current clip b is paired with replay item b
                att = sc["att"]
                p_v = correlation_probs(att["k_v"], sc["q_bar_a"], replay["q_bar_a"], sc["C_v"], sc["scale"])
                p_a = correlation_probs(att["k_a"], sc["q_bar_v"], replay["q_bar_v"], sc["C_a"], sc["scale"])
                p_v = self.check_finite("RCA probabilities p_v", p_v, 0.0)  # a diverged row prunes nothing
                p_a = self.check_finite("RCA probabilities p_a", p_a, 0.0)
            P_v, P_a = p_v, p_a
            if replay is not None:  # replayed clips are re-pruned with their stored p and re-selected with stored I
                I_v, I_a = torch.cat([I_v, replay["I_v"]]), torch.cat([I_a, replay["I_a"]])  # (2B, L)
                P_v, P_a = torch.cat([p_v, replay["p_v"]]), torch.cat([p_a, replay["p_a"]])  # (2B, L)
                video, audio = torch.cat([video, replay["video"]]), torch.cat([audio, replay["audio"]])
            if not self.uses_importance:
                I_v, I_a = uniform_importance(*I_v.shape, I_v.device), uniform_importance(*I_a.shape, I_a.device)
            # Step F (spec §3.6): Bernoulli pruning, then sampling ∝ I·(1 − z) and audio time chunks
            z_v, z_a = prune_mask(P_v, g), prune_mask(P_a, g)  # (2B, L_V), (2B, L_A) bool
            order_v = select_video_patches(I_v, z_v, self.K_V, g)  # (2B, L_V)
            order_a = select_audio_chunks(I_a, z_a, self.K_A, self.backbone.num_freq_tokens,
                                          self.cfg.stella.num_core_audio_times, g)  # (2B, L_A)
        return dict(video=gather_patches(video_patches(video, p), order_v, self.K_V),  # (2B, K_V, 3, p, p)
                    audio=gather_patches(audio_patches(audio, p), order_a, self.K_A),  # (2B, K_A, 1, p, p)
                    order_v=order_v, order_a=order_a, p_v=p_v, p_a=p_a)

    def memory_fields(self, batch: dict[str, Tensor], sc: dict[str, Any], core: dict[str, Tensor],
                      out: dict[str, Tensor]) -> dict[str, Tensor]:
        """spec §3.9: the augmented full clips, DER targets, prototypes, p and I of this iteration.

        task / label / index are kept for `stella buffer` only; training never reads them (task-free).
        """
        B = batch["video"].shape[0]
        return dict(video=batch["video"], audio=batch["audio"], z_a=out["z_a"][:B].detach(),
                    z_v=out["z_v"][:B].detach(), q_bar_v=sc["q_bar_v"], q_bar_a=sc["q_bar_a"], p_v=core["p_v"],
                    p_a=core["p_a"], I_v=sc["I_v"], I_a=sc["I_a"], **clip_ids(batch))

    def sample_replay(self, device: torch.device) -> dict[str, Tensor]:
        replay = self.buffer.sample(self.replay_batch, self.generators["replay"])
        return {k: v.to(device, non_blocking=True) for k, v in replay.items()}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.buffer.load_state_dict(state["buffer"])


class StellaPlus(Stella):
    """STELLA+ (spec §3.12): the buffer keeps only the selected core patches and their orderings (~50% of the
    bytes) and replays them unchanged. `method.stella.faithful_plus_rca_rows` reproduces bug B8."""

    def select(self, audio: Tensor, video: Tensor, sc: dict[str, Any], replay: dict[str, Tensor] | None) -> dict:
        p = self.backbone.patch_size
        if replay is None:
            return super().select(audio, video, sc, None)
        s, g = self.cfg.stella, self.generators["select"]
        if self.uses_rca:
            att = sc["att"]
            plus = select_plus_current(sc["I_v"], sc["I_a"], sc["C_v"], sc["C_a"], att["S_va"], att["k_v"], att["k_a"],
                                       sc["q_bar_v"], sc["q_bar_a"], replay["q_bar_v"], replay["q_bar_a"],
                                       K_A=self.K_A, num_freq_tokens=self.backbone.num_freq_tokens,
                                       chunk_times=s.num_core_audio_times, scale=sc["scale"], generator=g,
                                       faithful_plus_rca_rows=s.faithful_plus_rca_rows,
                                       uniform_choice=not self.uses_importance)
            # the Bernoulli draws inside ran on them already (select.prune_mask reads NaN as 0); the guard reports
            self.check_finite("RCA probabilities p_v", plus.p_v)
            self.check_finite("RCA probabilities p_a", plus.p_a)
        else:  # random / importance ablation: p ≡ 0, nothing pruned
            I_v, I_a = sc["I_v"], sc["I_a"]
            p_v, p_a = torch.zeros_like(I_v), torch.zeros_like(I_a)
            plus = PlusSelection(select_video_patches_plus(I_v, p_v.bool(), self.K_V, g),
                                 select_audio_chunks(I_a, p_a.bool(), self.K_A, self.backbone.num_freq_tokens,
                                                     s.num_core_audio_times, g), p_v, p_a)
        core_v = gather_patches(video_patches(video, p), plus.order_v, self.K_V)  # (B, K_V, 3, p, p)
        core_a = gather_patches(audio_patches(audio, p), plus.order_a, self.K_A)  # (B, K_A, 1, p, p)
        return dict(video=torch.cat([core_v, replay["core_v"]]), audio=torch.cat([core_a, replay["core_a"]]),
                    order_v=torch.cat([plus.order_v, replay["order_v"]]),
                    order_a=torch.cat([plus.order_a, replay["order_a"]]), p_v=plus.p_v, p_a=plus.p_a)

    def memory_fields(self, batch: dict[str, Tensor], sc: dict[str, Any], core: dict[str, Tensor],
                      out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Only the current clips' core patches, orderings, DER targets and prototypes; no full clips, I or p."""
        B = batch["video"].shape[0]
        return dict(core_v=core["video"][:B], core_a=core["audio"][:B], order_v=core["order_v"][:B],
                    order_a=core["order_a"][:B], z_a=out["z_a"][:B].detach(), z_v=out["z_v"][:B].detach(),
                    q_bar_v=sc["q_bar_v"], q_bar_a=sc["q_bar_a"], **clip_ids(batch))


def clip_ids(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Which clip a memory slot holds (task, label, dataset index): bookkeeping for `stella buffer`."""
    return {k: batch[k].reshape(-1).long() for k in ("task", "label", "index")}


METHODS: dict[str, type[Method]] = {
    "finetune": Finetune,
    "multitask": Finetune,  # the same learner, trained once on the union of tasks (train.py builds the schedule)
    "stella": Stella,
    "stella+": StellaPlus,
    "avm_pretrain": AVMPretrain,  # like multitask, one pass over the union of the tasks (train.py)
}

import stella_cli.baselines  # noqa: E402,F401  (ER, DER++, LUMP, MIR, GMED, CLS-ER, ESMER add themselves)
