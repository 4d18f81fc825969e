"""What the evaluation tasks share: the target, frozen-backbone features, segment padding, the head training loop.

method.md §6.3 defines the tasks.

Every task of `stella eval` (probe.py, ave.py, avs.py, msrvtt.py, localisation.py, and retrieval in eval_run.py)
is a function of a `Context` returning (result dict, table rows). A head never trains the backbone: `fit` sees
features (or inputs the caller turns into features under no_grad) and optimises only the head with AdamW (weight
decay on weight matrices only, as the authors' `get_parameter_groups`), `warmup_epochs` of linear warm-up and then a
cosine decay to 0, stepped per batch (the authors' `custom_lr_scheduler`; they also step it once more per epoch,
which only shifts the curve). The head of the last epoch is tested, or with `select_epoch: best_test` the authors'
choice: the epoch that scored best on the test split (method.md §6.3).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from stella_cli.audio import frame_geometry
from stella_cli.checkpoint import Loaded, load_backbone
from stella_cli.config import HeadConfig, Recipe
from stella_cli.console import console
from stella_cli.errors import StellaError
from stella_cli.model import CAVMAE, weight_decay_groups


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


@dataclass
class Fitted:
    """What `fit` did: the mean training loss per epoch, the epoch whose head is kept (1-based) and, with
    select_epoch best_test, the test score after every evaluated epoch."""

    losses: list[float]
    epoch: int
    scores: dict[int, float] = field(default_factory=dict)


def fit(head: nn.Module, cfg: HeadConfig, batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
        steps_per_epoch: int, loss_fn: Callable[[Tensor, Tensor], Tensor],
        on_epoch: Callable[[int, float], None] | None = None,
        evaluate: Callable[[], float] | None = None) -> Fitted:
    """Train `head` for cfg.epochs; batches(epoch) yields (input, target) pairs. With cfg.select_epoch "best_test",
    evaluate() (the test score, higher is better) runs after every cfg.eval_every-th epoch and after the last, and
    the head of the first epoch with the highest score is restored (the authors' run.py)."""
    groups = weight_decay_groups(head.named_parameters(), cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = cfg.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
    select_best = cfg.select_epoch == "best_test"
    if select_best and evaluate is None:
        raise ValueError("select_epoch best_test needs an evaluate function")
    head.train()
    losses, scores, best = [], {}, None  # best: (epoch, score, state)
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
        if select_best and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            head.eval()
            with torch.no_grad():
                scores[epoch + 1] = score = float(evaluate())
            head.train()
            if best is None or score > best[1]:  # ties keep the earlier epoch, as run.py's `<`
                best = (epoch + 1, score, copy.deepcopy(head.state_dict()))
    head.eval()
    if best is None:
        return Fitted(losses, cfg.epochs)
    head.load_state_dict(best[2])
    return Fitted(losses, best[0], scores)


def selection(cfg: HeadConfig, fitted: Fitted) -> dict[str, object]:
    """The result entries that say which epoch's head was tested and how it was chosen."""
    return {"select_epoch": cfg.select_epoch, "tested_epoch": fitted.epoch, "test_score_per_epoch": fitted.scores,
            "loss_per_epoch": fitted.losses}


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


def one_second_rows(sample_rate: int) -> int:
    """Fbank frames of a one-second waveform: 1 + (sr - window) // shift = 98 at 16 kHz (25 ms / 10 ms)."""
    window, shift, _ = frame_geometry(sample_rate)
    return 1 + (sample_rate - window) // shift


def one_second(fbank: np.ndarray, start_sample: int, sample_rate: int, target_length: int) -> np.ndarray:
    """The fbank of the waveform's [start, start + 1 s), cut from the clip's fbank (T, M): rows from
    round(start / shift), as many as a 1 s waveform has (98), zero-padded symmetrically to target_length, as the
    authors' AVE_Wav2fbank pads the fbank of the 1 s waveform. A Kaldi frame depends only on its own 25 ms (its DC
    offset is removed per frame, so removing the segment's mean first changes nothing), so the rows equal that
    fbank exactly when start is a multiple of the shift, and are at most half a shift (5 ms) early or late else."""
    _, shift, _ = frame_geometry(sample_rate)
    first = (int(start_sample) + shift // 2) // shift  # the nearest frame start
    return pad_segment(fbank[first:first + one_second_rows(sample_rate)], target_length)


def pad_segment(fbank: np.ndarray, target_length: int) -> np.ndarray:
    """(n, M) fbank of one second -> (target_length, M), zeros split evenly before and after (extra one after)."""
    n = fbank.shape[0]
    if n >= target_length:
        return fbank[:target_length]
    left = (target_length - n) // 2
    return np.pad(fbank, ((left, target_length - n - left), (0, 0)))
