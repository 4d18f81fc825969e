"""The method interface and what methods share: Method, Finetune, Multitask and the replay base.

A method is an nn.Module (so DDP can wrap it) holding the backbone and whatever the method adds (the AVM, a replay
buffer, teachers). `step(batch)` = `forward(batch)` returns {"loss_*": scalar}; train.py sums every value, runs
backward, the AMP scaler and the optimiser step. Methods never see a task id during training (task-free protocol,
baselines.md §1.3): `begin_task` / `end_task` exist for bookkeeping only. `Replay` owns the per-rank reservoir
memory that STELLA (stella.py) and the replay baselines (baselines.py) share. The table of every method by name is
factory.METHODS.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stella_cli.config import AVMConfig, MethodConfig
from stella_cli.model import CAVMAE
from stella_cli.replay import ReservoirBuffer


class Method(nn.Module):
    """Common state: the backbone and one torch.Generator per concern, seeded from (seed, rank), so a
    run is reproducible and a resumed run continues the same stream."""

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
    """Sequential MAE + contrastive training with no memory (baselines.md §0). Multitask = this on the union."""

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.backbone(batch["audio"], batch["video"], generator=self.generators["mask"])
        return self.backbone_losses(out)


class Multitask(Finetune):
    """Multitask (baselines.md §2.2): the Finetune learner, trained once on the union of every task's clips
    (train.py builds that schedule from factory.METHODS); the upper bound of the paper's tables."""


class Replay(Method):
    """A method with a per-rank reservoir memory (baselines.md §1.4, method.md §3.9): B_m rows replayed per
    step (method.replay_batch_size, default B), drawn uniformly without replacement; the current clips are offered
    to the reservoir after the forward, so a step never replays its own batch. Subclasses say what a slot stores."""

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        self.replay_batch = cfg.replay_batch_size or self.batch_size  # B_m rows per step (= B by default)
        self.buffer = ReservoirBuffer(self.memory_per_rank)

    def sample(self, n: int, device: torch.device, return_indices: bool = False) -> Any:
        """min(n, stored) rows on `device`, plus their slots (n',) when return_indices (GMED writes back)."""
        rows, idx = self.buffer.sample(n, self.generators["replay"], return_indices=True)
        rows = {k: v.to(device, non_blocking=True) for k, v in rows.items()}
        return (rows, idx) if return_indices else rows

    def remember(self, fields: dict[str, Tensor | None], keep: Tensor | None = None) -> None:
        """Offer the current clips' `fields` (each (B, ...); None = not stored) to the reservoir; `keep` (B,) bool
        offers only some (ESMER)."""
        fields = {k: v for k, v in fields.items() if v is not None}
        if keep is not None:
            fields = {k: v[keep.to(v.device)] for k, v in fields.items()}
        if next(iter(fields.values())).shape[0]:
            self.buffer.add(generator=self.generators["replay"], **fields)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.buffer.load_state_dict(state["buffer"])


def clip_ids(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Which clip a memory slot holds (task, label, dataset index): bookkeeping for `stella buffer`."""
    return {k: batch[k].reshape(-1).long() for k in ("task", "label", "index")}
