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
from stella_cli.model import (AVM, CAVMAE, audio_patches, frozen_autocast, load_authors_checkpoint, matching_loss,
                              video_patches)
from stella_cli.replay import ReservoirBuffer
from stella_cli.scoring import candidates, correlation_probs, patch_importance, query_prototypes
from stella_cli.select import (first_iteration_order, gather_patches, prune_mask, select_audio_chunks,
                               select_plus_current, select_video_patches)


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

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.step(batch)

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def begin_task(self, task: str) -> None:
        """Task-free methods ignore boundaries; kept so task-aware baselines can hook in."""

    def end_task(self, task: str) -> None:
        """See begin_task."""

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


class Stella(Method):
    """STELLA (stella_spec §3): AVM-guided localized patch selection + replay with a DER-style penalty.

    One iteration is steps A-I of the spec, in that order. The RCA and the matching loss use the AVM weights from
    before this iteration's update; the buffer is written after the forward.
    """

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        self.avm = AVM(backbone.embed_dim, backbone.num_heads, fix_head_reshape=self.avm_cfg.fix_head_reshape)
        if self.avm_cfg.checkpoint:  # spec §2.5: an AVM pre-trained on a frozen backbone; "" = random (B2)
            load_authors_checkpoint(self.avm, self.avm_cfg.checkpoint)
        s = cfg.stella
        self.K_V = num_core_tokens(backbone.num_video_tokens, s.core_video_ratio)
        self.K_A = num_core_tokens(backbone.num_audio_tokens, s.core_audio_ratio)
        self.replay_batch = cfg.replay_batch_size or self.batch_size
        self.buffer = ReservoirBuffer(self.memory_per_rank)

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        video, audio = batch["video"], batch["audio"]  # (B, F, 3, S, S), (B, 1, T, M)
        B = video.shape[0]
        scores = self.score(audio, video)  # steps A-D
        replay = None if len(self.buffer) == 0 else self.sample_replay(video.device)
        core = self.select(audio, video, scores, replay)  # steps E-F
        # Step G (spec §3.7): MAE + contrastive on the core patches with modality-guided masking
        out = self.backbone(core["audio"], core["video"], ids_a=core["order_a"], ids_v=core["order_v"],
                            generator=self.generators["mask"])
        losses = {**self.backbone_losses(out), "loss_vam": scores["loss_vam"]}
        # Step H (spec §3.8): DER-style penalty on the replayed clips' stored pooled embeddings
        if replay is not None:
            losses["loss_pen"] = self.cfg.alpha * (F.mse_loss(out["z_a"][B:], replay["z_a"])
                                                   + F.mse_loss(out["z_v"][B:], replay["z_v"]))
        # Step I (spec §3.9): offer every current clip to the reservoir
        self.buffer.add(generator=self.generators["replay"], **self.memory_fields(batch, scores, core, out))
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
        I_v = patch_importance(att["S_av"], s.att_temperature)  # (B, L_V)
        I_a = patch_importance(att["S_va"], s.att_temperature)  # (B, L_A)
        C_v, C_a = candidates(I_v, self.K_V), candidates(I_a, self.K_A)  # (B, K_V), (B, K_A)
        # Step C (spec §3.3): train the AVM on the current clips, backbone frozen
        loss_vam = s.matching_loss_weight * matching_loss(self.backbone, self.avm, c_a, c_v, self.generators["mask"],
                                                          joint=(e_a, e_v), frozen_bf16=s.frozen_bf16)
        # Step D (spec §3.4): importance-weighted query prototypes
        q_bar_v = query_prototypes(att["q_v"], I_v, C_v)  # (B, H, d_h)
        q_bar_a = query_prototypes(att["q_a"], I_a, C_a)  # (B, H, d_h)
        return dict(att=att, I_v=I_v, I_a=I_a, C_v=C_v, C_a=C_a, q_bar_v=q_bar_v, q_bar_a=q_bar_a, loss_vam=loss_vam,
                    scale=att["q_v"].shape[-1] ** -0.5)

    def select(self, audio: Tensor, video: Tensor, sc: dict[str, Any], replay: dict[str, Tensor] | None) -> dict:
        """Steps E-F: core patches and orderings of the current clips, then the replayed ones (2B rows)."""
        g, p = self.generators["select"], self.backbone.patch_size
        if replay is None:  # first iteration (spec §9.3 B9): plain top-K, no chunking, stored p = 0
            p_v, p_a = torch.zeros_like(sc["I_v"]), torch.zeros_like(sc["I_a"])
            order_v, order_a = first_iteration_order(sc["I_v"], self.K_V), first_iteration_order(sc["I_a"], self.K_A)
        else:
            # Step E (spec §3.5): replay-guided correlation; current clip b is paired with replay item b
            att = sc["att"]
            p_v = correlation_probs(att["k_v"], sc["q_bar_a"], replay["q_bar_a"], sc["C_v"], sc["scale"])  # (B, L_V)
            p_a = correlation_probs(att["k_a"], sc["q_bar_v"], replay["q_bar_v"], sc["C_a"], sc["scale"])  # (B, L_A)
            # Step F (spec §3.6): replayed clips are re-pruned with their stored p and re-selected with stored I
            z_v = prune_mask(torch.cat([p_v, replay["p_v"]]), g)  # (2B, L_V) bool
            z_a = prune_mask(torch.cat([p_a, replay["p_a"]]), g)  # (2B, L_A) bool
            order_v = select_video_patches(torch.cat([sc["I_v"], replay["I_v"]]), z_v, self.K_V, g)  # (2B, L_V)
            order_a = select_audio_chunks(torch.cat([sc["I_a"], replay["I_a"]]), z_a, self.K_A,
                                          self.backbone.num_freq_tokens, self.cfg.stella.num_core_audio_times, g)
            video, audio = torch.cat([video, replay["video"]]), torch.cat([audio, replay["audio"]])
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
        att, s = sc["att"], self.cfg.stella
        plus = select_plus_current(sc["I_v"], sc["I_a"], sc["C_v"], sc["C_a"], att["S_va"], att["k_v"], att["k_a"],
                                   sc["q_bar_v"], sc["q_bar_a"], replay["q_bar_v"], replay["q_bar_a"], K_A=self.K_A,
                                   num_freq_tokens=self.backbone.num_freq_tokens, chunk_times=s.num_core_audio_times,
                                   scale=sc["scale"], generator=self.generators["select"],
                                   faithful_plus_rca_rows=s.faithful_plus_rca_rows)
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
}
