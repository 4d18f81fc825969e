"""The method interface and what methods share: Method, Finetune, Multitask and the replay base.

A method is an nn.Module (so DDP can wrap it) holding the backbone and whatever the method adds (the AVM, a replay
buffer, teachers). `step(batch)` = `forward(batch)` returns {"loss_*": scalar}; train.py sums every value, runs
backward, the AMP scaler and the optimiser step. Methods never see a task id during training (task-free protocol,
baselines.md §1.3): `begin_task` / `end_task` exist for bookkeeping only. `Replay` owns the per-rank reservoir
memory that STELLA (stella.py) and the replay baselines (baselines.py) share. The table of every method by name is
factory.METHODS.

One optimiser step (method.md §5.1): train.py calls `begin_step(B)`, then `forward` on each micro-batch of the B
current clips (one call without optim.micro_batch_size), then `end_step()` before the optimiser step. Whatever a
method does once per step (replay B_m rows, write the memory, count a teacher step) is spread over or deferred to
the step, so micro-batches change how the step's rows are grouped, not how many are replayed. A `step` called on
its own (tests, scripts) is a whole optimiser step.
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
        self.step_rows: int | None = None  # current clips of train.py's optimiser step in progress; None: none open
        self.micro: tuple[int, int] | None = None  # rows [start, stop) of it that this call of `step` trains

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
        if self.step_rows is not None:  # inside train.py's step: which of its rows this micro-batch holds
            start = self.micro[1] if self.micro else 0
            self.micro = (start, start + batch["video"].shape[0])
        return self.step(batch)

    def begin_step(self, rows: int) -> None:
        """train.py, before the micro-batches of one optimiser step on `rows` current clips (per rank)."""
        self.step_rows, self.micro = rows, None

    def end_step(self) -> None:
        """train.py, after the last micro-batch's backward, before the optimiser step: what happens once per step."""
        self.step_rows, self.micro = None, None

    @property
    def whole_step(self) -> bool:
        """This call of `step` is a whole optimiser step (no train.py step open: a direct call)."""
        return self.step_rows is None

    def share(self, n: int) -> int:
        """Of n rows per optimiser step, this call's part: all n for a whole step; in a micro-batch of rows
        [start, stop) of B, ⌊n·stop/B⌋ − ⌊n·start/B⌋, so the micro-batches' parts add up to n exactly."""
        if self.step_rows is None or self.micro is None:
            return n
        start, stop = self.micro
        return n * stop // self.step_rows - n * start // self.step_rows

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
    to the reservoir after the forward, so a step never replays its own batch. Subclasses say what a slot stores.

    Micro-batches (method.md §5.1) replay their share of the step's rows (`replay_size`), taken in turn from one
    permutation of the stored rows drawn once per step, and their clips are offered to the reservoir when the step
    ends: the step replays the same B_m rows and leaves the same memory as without micro-batches."""

    def __init__(self, backbone: CAVMAE, cfg: MethodConfig, **kwargs):
        super().__init__(backbone, cfg, **kwargs)
        self.replay_batch = cfg.replay_batch_size or self.batch_size  # B_m rows per step (= B by default)
        self.buffer = ReservoirBuffer(self.memory_per_rank)
        self.step_order: Tensor | None = None  # the step's permutation of the stored rows, and how much is taken
        self.step_taken = 0
        self.pending: list[dict[str, Tensor]] = []  # the step's clips, offered to the reservoir at its end

    def replay_size(self, per_step: int) -> int:
        """Rows this call of `step` draws, of `per_step` per optimiser step: none from an empty memory, at most the
        stored rows per step, shared over the micro-batches (`share`)."""
        return self.share(min(per_step, len(self.buffer)))

    def sample(self, n: int, device: torch.device, return_indices: bool = False) -> Any:
        """n rows (at most the stored ones) on `device`, uniform without replacement, plus their slots (n',) when
        return_indices (GMED writes back). Within a step, successive calls take the next rows of one permutation."""
        if self.whole_step or self.step_order is None:
            self.step_order, self.step_taken = self.buffer.permutation(self.generators["replay"]), 0
        idx = self.step_order[self.step_taken:self.step_taken + n]  # (n',) long
        self.step_taken += len(idx)
        rows = {k: v.to(device, non_blocking=True) for k, v in self.buffer.rows(idx).items()}
        return (rows, idx) if return_indices else rows

    def remember(self, fields: dict[str, Tensor | None], keep: Tensor | None = None) -> None:
        """Offer the current clips' `fields` (each (B, ...); None = not stored) to the reservoir, now for a whole
        step, else when the step ends; `keep` (B,) bool offers only some (ESMER)."""
        fields = {k: v.detach() for k, v in fields.items() if v is not None}
        if keep is not None:
            fields = {k: v[keep.to(v.device)] for k, v in fields.items()}
        if next(iter(fields.values())).shape[0]:
            self.pending.append(fields)
        if self.whole_step:
            self.write_pending()

    def write_pending(self) -> None:
        for fields in self.pending:  # in row order: the same slots as one call with every row
            self.buffer.add(generator=self.generators["replay"], **fields)
        self.pending = []

    def end_step(self) -> None:
        self.write_pending()
        self.step_order = None
        super().end_step()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.buffer.load_state_dict(state["buffer"])


def clip_ids(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Which clip a memory slot holds (task, label, dataset index): bookkeeping for `stella buffer`."""
    return {k: batch[k].reshape(-1).long() for k in ("task", "label", "index")}
