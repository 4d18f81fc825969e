"""What the evaluation tasks share: the target, frozen-backbone features, segment padding, the head training loop.

method.md §6.3 defines the tasks.

Every task of `stella eval` (probe.py, ave.py, avs.py, msrvtt.py, localisation.py, and retrieval in eval_run.py)
is a function of a `Context` returning (result dict, table rows). A head never trains the backbone: `fit` sees
features (or inputs the caller turns into features under no_grad) and optimises only the head with AdamW,
`warmup_epochs` of linear warm-up and then a cosine decay to 0, stepped per batch (the authors'
`custom_lr_scheduler`; they also step it once more per epoch, which only shifts the curve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from stella_cli.checkpoint import Loaded, load_backbone
from stella_cli.config import HeadConfig, Recipe
from stella_cli.console import console
from stella_cli.errors import StellaError
from stella_cli.model import CAVMAE

FBANK_FRAMES_PER_SECOND = 100  # 10 ms shift


@dataclass
class Target:
    """What one `stella eval` argument resolves to."""

    label: str  # run (or checkpoint) name, for tables
    recipe: Recipe
    recipe_path: str  # the recipe file the result names
    checkpoints: list[Path]  # task checkpoints in stream order, ending with `final`
    final: Path  # the checkpoint the downstream tasks use
    results_dir: Path
    run_dir: Path | None = None


@dataclass
class Context:
    """One `stella eval` target on its device: what every task function receives."""

    target: Target
    device: torch.device
    amp: torch.dtype | None
    quiet: bool
    all_tasks: list[str]  # the stream's tasks (the retrieval gallery's)

    def log(self, message: str) -> None:
        if not self.quiet:
            console.print(message)

    def load(self, path: Path | None = None) -> Loaded:
        """A checkpoint of the target (default: the final one) on the device, backbone frozen."""
        return load_backbone(path or self.target.final, self.target.recipe, self.device)


class TaskSkipped(StellaError):
    """The task does not apply to this target (no AVM, no ground truth, no prepared data); `--task all` goes on."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: (step + 1) / warmup_steps during warm-up, then 0.5·(1 + cos(π·progress)) down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def fit(head: nn.Module, cfg: HeadConfig, batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
        steps_per_epoch: int, loss_fn: Callable[[Tensor, Tensor], Tensor],
        on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `head` for cfg.epochs; batches(epoch) yields (input, target) pairs. Returns the mean loss per epoch."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = cfg.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
    head.train()
    losses = []
    for epoch in range(cfg.epochs):
        running, n = 0.0, 0
        for x, y in batches(epoch):
            loss = loss_fn(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running, n = running + loss.item(), n + 1
        losses.append(running / max(n, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    head.eval()
    return losses


def topk_correct(probs: Tensor, labels: Tensor, k: int) -> Tensor:
    """(N,) bool: label among the k most probable classes. probs (N, C), labels (N,)."""
    k = min(k, probs.shape[1])
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def epoch_logger(name: str, epochs: int, log: Callable[[str], None] | None) -> Callable[[int, float], None] | None:
    """fit's on_epoch callback printing "<name> epoch e/E: loss x" (None without a log function)."""
    if log is None:
        return None
    return lambda epoch, loss: log(f"{name} epoch {epoch + 1}/{epochs}: loss {loss:.4f}")


def feature_batches(x: Tensor, y: Tensor, batch_size: int,
                    seed: int) -> Callable[[int], Iterable[tuple[Tensor, Tensor]]]:
    """batches(epoch) over cached features: a permutation from (seed, epoch), last partial batch kept."""
    def batches(epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
    return batches


@torch.no_grad()
def joint_features(backbone: CAVMAE, audio: Tensor, video: Tensor, amp: torch.dtype | None) -> Tensor:
    device = next(backbone.parameters()).device
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return backbone.joint_embed(audio.to(device), video.to(device)).float()


def pad_segment(fbank: np.ndarray, target_length: int) -> np.ndarray:
    """(n, M) fbank of one second -> (target_length, M), zeros split evenly before and after (extra one after)."""
    n = fbank.shape[0]
    if n >= target_length:
        return fbank[:target_length]
    left = (target_length - n) // 2
    return np.pad(fbank, ((left, target_length - n - left), (0, 0)))
