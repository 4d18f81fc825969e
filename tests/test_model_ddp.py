"""InfoNCE with cross-rank negatives: a 2-process gloo run equals one process on the whole batch (method.md §1.7)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stella_cli.config import ModelConfig, resolve_model_preset
from stella_cli.model import CAVMAE

B, N_A, N_V = 6, 5, 7  # whole batch; visible audio / video tokens fed to the contrastive path


def setup(faithful_contrast_grad: bool = False):
    """The same tiny model and visible tokens on every process."""
    torch.manual_seed(0)
    cfg = resolve_model_preset(ModelConfig(preset="tiny", faithful_contrast_grad=faithful_contrast_grad))
    model = CAVMAE(cfg, 2, 64, 128, 64)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(B, N_A, 64, generator=g), torch.randn(B, N_V, 64, generator=g)


def step(model, x_a, x_v, reduction="mean"):
    """loss_con of the model and the gradients of every parameter it reaches."""
    model.zero_grad(set_to_none=True)
    loss, z_a, z_v = model.forward_contrastive(x_a, x_v, reduction)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def average(grads: dict) -> dict:
    """What DDP does with the gradients: the mean over ranks."""
    for g in grads.values():
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, x_a, x_v = setup()
        part = slice(rank * B // world, (rank + 1) * B // world)
        loss, grads = step(model, x_a[part], x_v[part])
        dist.all_reduce(loss)  # each rank's mean over its own anchors, averaged over ranks
        loss /= world
        grads = average(grads)
        faithful, _, _ = setup(faithful_contrast_grad=True)  # model.faithful_contrast_grad: the authors' gather
        faithful_loss, authors = step(faithful, x_a[part], x_v[part])
        authors = average(authors)
        dist.all_reduce(faithful_loss)
        faithful_loss /= world
        per_sample, _ = step(model, x_a[part], x_v[part], reduction="none")
        torch.save({"loss": loss, "grads": grads, "authors": authors, "authors_loss": faithful_loss,
                    "per_sample": per_sample},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down (a rank leaving first can abort the other)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_gathered_infonce_matches_one_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, x_a, x_v = setup()
    loss, grads = step(model, x_a, x_v)
    assert not dist.is_initialized()  # single process: gather_with_grad is the identity

    for r in ranks:
        assert torch.allclose(r["loss"], loss, atol=1e-6)
        assert set(r["grads"]) == set(grads) and len(grads) > 10
        for n in grads:
            assert torch.allclose(r["grads"][n], grads[n], atol=1e-6, rtol=1e-4), n
    # the authors' gather (model.faithful_contrast_grad) gives the same loss but drops the gradient that other
    # ranks' anchors send to local embeddings
    assert torch.allclose(ranks[0]["authors_loss"], loss, atol=1e-6)
    authors = ranks[0]["authors"]
    assert any(not torch.allclose(authors[n], grads[n], atol=1e-6, rtol=1e-4) for n in grads)
    # per-sample losses: each rank returns its own rows, which concatenate to the single-process vector
    per_sample = torch.cat([r["per_sample"] for r in ranks])
    single, _ = step(model, x_a, x_v, reduction="none")
    assert per_sample.shape == (B,) and torch.allclose(per_sample, single, atol=1e-6)
