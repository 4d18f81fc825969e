"""Where a process runs: device, process group, AMP dtype, rank helpers and the contrastive all-gather.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it every helper is a no-op for one process (rank 0 of 1), so
single-process code calls them freely (MAE's `misc.py`, open_clip's `distributed.py`). The contrastive loss gathers
the other ranks' embeddings through `gather_with_grad` (method.md §1.7); nothing else all-gathers tensors.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from stella_cli.errors import StellaError


def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) for train.device = auto | cpu | cuda; initialises the process group under torchrun."""
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise StellaError(f"train.device=cuda: no CUDA device is available here (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use train.device=auto or cpu")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise StellaError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                          f"visible; start at most that many processes per node")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """optim.amp -> the autocast dtype, None = fp32. 'fp16' is the authors' (`torch.cuda.amp.autocast()`), 'auto'
    bf16 where supported, else fp16; always fp32 on the CPU."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def grad_scaler(amp: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of the step: active under fp16, as the authors' `utils/amp.py` (torch's defaults: scale 2^16,
    halved on an inf / NaN gradient, whose step it skips, doubled after 2000 good steps); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp == torch.float16)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduced(flags: Tensor, device: torch.device) -> Tensor:
    """The sum over ranks of a small CPU tensor, returned on the CPU (NCCL reduces CUDA tensors only)."""
    flags = flags.to(device)
    dist.all_reduce(flags)
    return flags.cpu()


def average_over_ranks(tensors: list[Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place; nothing to do in one process."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)
            t /= dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; [obj] in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank; `obj` itself in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap(module: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """DistributedDataParallel around `module` for several processes; the module itself for one."""
    if world == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(module: torch.nn.Module, sync: bool) -> Any:
    """Inside: DDP skips its gradient all-reduce unless `sync` (micro-batches before the last); a no-op otherwise."""
    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def unwrap(module: torch.nn.Module) -> Any:
    """The module inside a DistributedDataParallel wrapper (the one whose state is saved), or the module itself."""
    return module.module if isinstance(module, DistributedDataParallel) else module


class _GatherAllReduceGrad(torch.autograd.Function):
    """all_gather in the forward; in the backward every rank's gradient w.r.t. the gathered batch is summed and
    each rank keeps its own slice, so DDP's gradient average equals the single-process gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rank, world = rank_world()
        n = grad.shape[0] // world
        return grad[rank * n:(rank + 1) * n]


def gather_with_grad(x: Tensor, remote_grad: bool = True) -> Tensor:
    """Concatenate x (B, ...) of all ranks -> (W·B, ...); identity when torch.distributed is not initialised.

    The local slice keeps its gradient.  remote_grad=True also sends the gradient of each slice back to the rank
    that owns it (the single-process gradient under DDP); False is the authors' gather: other ranks' rows are
    constants (objectives.py:271-288), which drops those gradient terms.
    """
    rank, world = rank_world()
    if world == 1:
        return x
    if remote_grad:
        return _GatherAllReduceGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)
