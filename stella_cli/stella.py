"""STELLA and STELLA+ (method.md §3), and the AVM's pre-training on a frozen backbone (§2.5).

STELLA: localized patch selection guided by the AVM, and replay with a DER-style penalty. The file keeps the authors'
name (models/cl_methods/stella.py).

One STELLA iteration is steps A-I of method.md §3, one call each, in that order:
  A  frozen unimodal codes            B  localized patch importance I_v, I_a     C  the AVM's matching loss
  D  query prototypes q̄_v, q̄_a       E  replay-guided correlation p_v, p_a      F  pruning + core-patch selection
  G  MAE + contrastive on core patches H  DER-style penalty on replayed clips      I  offer the clips to the memory
The RCA and the matching loss use the AVM weights from before this iteration's update; the memory is written
after the forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stella_cli.checkpoint import load_avm_checkpoint
from stella_cli.config import AVMConfig, MethodConfig, num_core_tokens
from stella_cli.methods import Method, Replay, clip_ids
from stella_cli.model import AVM, CAVMAE, audio_patches, frozen_autocast, matching_loss, video_patches
from stella_cli.scoring import candidates, correlation_probs, patch_importance, query_prototypes
from stella_cli.select import (PlusSelection, first_iteration_order, gather_patches, prune_mask, select_audio_chunks,
                               select_plus_current, select_video_patches, select_video_patches_plus,
                               uniform_importance)


def build_avm(backbone: CAVMAE, cfg: AVMConfig) -> AVM:
    """The AVM for this backbone: model.avm.checkpoint if set (method.md §2.5), else random as the authors' (B2)."""
    heads = cfg.num_heads or backbone.num_heads  # a recipe's is resolved (12 at base, method.md §9.3 "AVM heads")
    avm = AVM(backbone.embed_dim, heads, fix_head_reshape=cfg.fix_head_reshape)
    if cfg.checkpoint:
        load_avm_checkpoint(avm, cfg.checkpoint)
    return avm


class Stella(Replay):
    """STELLA (method.md §3): AVM-guided localized patch selection + replay with a DER-style penalty.

    One iteration is steps A-I of the spec, in that order. The RCA and the matching loss use the AVM weights from
    before this iteration's update; the buffer is written after the forward.
    """

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        s = cfg.stella
        # Patch-selection ablations (baselines.md §2.13, docs/design.md "Ablations"): without RCA p ≡ 0; without importance
        # the choice is uniform among the unpruned patches. `random` uses neither, so it has no AVM at all: no frozen
        # scoring passes, no matching loss, no AVM parameters (DDP would otherwise wait for their gradients).
        self.uses_rca = s.selection in ("full", "correlation")
        self.uses_importance = s.selection in ("full", "importance")
        self.avm = None
        if s.selection != "random":
            self.avm = build_avm(backbone, self.avm_cfg)
        self.K_V = num_core_tokens(backbone.num_video_tokens, s.core_video_ratio)
        self.K_A = num_core_tokens(backbone.num_audio_tokens, s.core_audio_ratio)

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        video, audio = batch["video"], batch["audio"]  # (B, F, 3, S, S), (B, 1, T, M)
        B = video.shape[0]
        scores = self.score(audio, video) if self.avm is not None else self.uniform_scores(B, video.device)  # A-D
        n = self.replay_size(self.replay_batch)
        replay = self.sample(n, video.device) if n else None
        core = self.select(audio, video, scores, replay)  # steps E-F
        # Step G (method.md §3.7): MAE + contrastive on the core patches with modality-guided masking
        out = self.backbone(core["audio"], core["video"], ids_a=core["order_a"], ids_v=core["order_v"],
                            generator=self.generators["mask"])
        losses = self.backbone_losses(out)
        if self.avm is not None:
            losses["loss_vam"] = scores["loss_vam"]
        # Step H (method.md §3.8): DER-style penalty on the replayed clips' stored pooled embeddings
        if replay is not None:
            losses["loss_pen"] = self.cfg.alpha * (F.mse_loss(out["z_a"][B:], replay["z_a"])
                                                   + F.mse_loss(out["z_v"][B:], replay["z_v"]))
        # Step I (method.md §3.9): offer every current clip to the reservoir
        self.remember(self.memory_fields(batch, scores, core, out))
        return losses

    def score(self, audio: Tensor, video: Tensor) -> dict[str, Any]:
        """Steps A-D: frozen codes, patch importance, the AVM's matching loss, query prototypes."""
        s = self.cfg.stella
        # Step A (method.md §3.1): frozen unimodal codes, no masking, no graph
        with torch.no_grad():
            with frozen_autocast(audio.device, s.frozen_bf16):  # default off: fp32 (or the step's AMP)
                c_a, c_v = self.backbone.unimodal_codes(audio, video)  # (B, L_A, D), (B, L_V, D)
                # Step B (method.md §3.2): localized patch importance from the AVM's attention logits
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
        # Step C (method.md §3.3): train the AVM on the current clips, backbone frozen
        loss_vam = s.matching_loss_weight * matching_loss(self.backbone, self.avm, c_a, c_v, self.generators["mask"],
                                                          joint=(e_a, e_v), frozen_bf16=s.frozen_bf16)
        # Step D (method.md §3.4): importance-weighted query prototypes
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
        if self.buffer.is_empty() and self.uses_importance:  # first iteration (method.md §9.3 B9): top-K, no
            # chunking, p = 0; (a micro-batch without replayed rows of its own samples as below, with p = 0)
            p_v, p_a = torch.zeros_like(sc["I_v"]), torch.zeros_like(sc["I_a"])
            order_v, order_a = first_iteration_order(sc["I_v"], self.K_V), first_iteration_order(sc["I_a"], self.K_A)
        else:
            I_v, I_a = sc["I_v"], sc["I_a"]  # (B, L_V), (B, L_A)
            p_v, p_a = torch.zeros_like(I_v), torch.zeros_like(I_a)  # no RCA: nothing is pruned
            if replay is not None and self.uses_rca:
                # Step E (method.md §3.5): replay-guided correlation; current clip b is paired with replay item b
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
            # Step F (method.md §3.6): Bernoulli pruning, then sampling ∝ I·(1 − z) and audio time chunks
            z_v, z_a = prune_mask(P_v, g), prune_mask(P_a, g)  # (2B, L_V), (2B, L_A) bool
            order_v = select_video_patches(I_v, z_v, self.K_V, g)  # (2B, L_V)
            order_a = select_audio_chunks(I_a, z_a, self.K_A, self.backbone.num_freq_tokens,
                                          self.cfg.stella.num_core_audio_times, g)  # (2B, L_A)
        return dict(video=gather_patches(video_patches(video, p), order_v, self.K_V),  # (2B, K_V, 3, p, p)
                    audio=gather_patches(audio_patches(audio, p), order_a, self.K_A),  # (2B, K_A, 1, p, p)
                    order_v=order_v, order_a=order_a, p_v=p_v, p_a=p_a)

    def memory_fields(self, batch: dict[str, Tensor], sc: dict[str, Any], core: dict[str, Tensor],
                      out: dict[str, Tensor]) -> dict[str, Tensor]:
        """method.md §3.9: the augmented full clips, DER targets, prototypes, p and I of this iteration.

        task / label / index are kept for `stella buffer` only; training never reads them (task-free).
        """
        B = batch["video"].shape[0]
        return dict(video=batch["video"], audio=batch["audio"], z_a=out["z_a"][:B].detach(),
                    z_v=out["z_v"][:B].detach(), q_bar_v=sc["q_bar_v"], q_bar_a=sc["q_bar_a"], p_v=core["p_v"],
                    p_a=core["p_a"], I_v=sc["I_v"], I_a=sc["I_a"], **clip_ids(batch))


class StellaPlus(Stella):
    """STELLA+ (method.md §3.12): the buffer keeps only the selected core patches and their orderings (~50% of the
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


class AVMPretrain(Method):
    """AVM pre-training on a frozen backbone (method.md §2.5, the authors' Finetune_submodule).

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
