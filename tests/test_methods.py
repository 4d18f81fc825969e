"""One STELLA iteration (methods.py, method.md §3): token counts, frozen passes, losses, memory contents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import PAPER_SIZES, batch, make_method, record_sequences, stella_fields, stella_plus_fields

from stella_cli.methods import Finetune
from stella_cli.stella import Stella, StellaPlus
from stella_cli.replay import summarize_buffer


def test_token_counts_and_frozen_passes_at_the_paper_sizes():
    """method.md §3.7: 102 / 156 tokens in the modality layers, 258 in the joint pass, decoder 256 / 392; the frozen
    scoring passes run over all 512 / 784 / 1296 tokens and build no graph."""
    method = make_method(Stella)
    calls = record_sequences(method)
    for step in range(2):  # the first iteration (empty buffer) and one with replay
        calls.clear()
        losses = method.step(batch(seed=step))
        frozen = [c for c in calls if not c[2]]
        trained = [c for c in calls if c[2]]
        # Step A: unimodal codes over every token; Step B + the matching loss: joint passes over 512 + 784 tokens
        assert {(n, L) for n, L, _ in frozen} == {("blocks_a", 512), ("blocks_v", 784), ("blocks_u", 1296)}
        # one joint pass: with B = 2 the matching loss has only positives, whose joint codes are the scoring pass's
        assert len([c for c in frozen if c[0] == "blocks_u"]) == 1
        # Step G on the core patches: modality layers, joint fusion, per-modality contrastive passes, decoder
        assert {(n, L) for n, L, _ in trained} == {("blocks_a", 102), ("blocks_v", 156), ("blocks_u", 258),
                                                   ("blocks_u", 102), ("blocks_u", 156), ("decoder_blocks", 256),
                                                   ("decoder_blocks", 392)}
        assert ("loss_pen" in losses) == (step == 1)


def test_loss_terms_and_where_their_gradients_go():
    method = make_method(Stella, sizes=dict(num_frames=2, image_size=32, target_length=64, num_mel_bins=32))
    small = dict(num_frames=2, image_size=32, target_length=64, num_mel_bins=32)
    method.step(batch(seed=0, sizes=small))
    captured = {}
    sample, forward = method.sample, method.backbone.forward
    method.sample = lambda n, device: captured.setdefault("replay", sample(n, device))
    method.backbone.forward = lambda *a, **k: captured.setdefault("out", forward(*a, **k))
    losses = method.step(batch(seed=1, sizes=small))
    assert set(losses) == {"loss_mae_a", "loss_mae_v", "loss_con", "loss_vam", "loss_pen"}
    replay, out = captured["replay"], captured["out"]
    B = 2
    assert out["z_a"].shape[0] == 2 * B  # current + replayed clips through the backbone together
    expected = 0.5 * (F.mse_loss(out["z_a"][B:], replay["z_a"]) + F.mse_loss(out["z_v"][B:], replay["z_v"]))
    assert torch.allclose(losses["loss_pen"], expected)  # method.md §3.8: alpha 0.5, stored DER targets
    avm = {n for n, _ in method.avm.named_parameters()}
    for name in ("loss_vam", "loss_mae_v", "loss_pen"):
        method.zero_grad(set_to_none=True)
        losses[name].backward(retain_graph=True)
        reached = {n.removeprefix("avm.") for n, p in method.named_parameters() if p.grad is not None}
        if name == "loss_vam":  # method.md §3.3: only the AVM learns from the matching loss
            assert reached == avm
        else:  # the backbone losses never reach the AVM
            assert reached and not reached & avm


def test_first_iteration_stores_zero_p_and_later_p_only_on_candidates():
    method = make_method(Stella, B=4, memory=16)
    method.step(batch(B=4, seed=0))
    first = {k: v[:4] for k, v in method.buffer.fields.items()}
    assert torch.count_nonzero(first["p_v"]) == 0 and torch.count_nonzero(first["p_a"]) == 0  # B9
    torch.testing.assert_close(first["I_v"].sum(1), torch.ones(4))
    method.step(batch(B=4, seed=1))
    second = {k: v[4:8] for k, v in method.buffer.fields.items()}
    assert (second["p_v"] > 0).sum(1).max() <= method.K_V == 392  # RCA only on the candidates
    assert (second["p_a"] > 0).sum(1).max() <= method.K_A == 256
    assert ((second["p_v"] >= 0) & (second["p_v"] <= 1)).all()
    assert second["task"].tolist() == [0] * 4 and second["index"].tolist() == [4, 5, 6, 7]
    assert method.buffer.n_seen == 8


def test_stella_plus_stores_half_the_bytes_and_replays_as_stored():
    stella, plus = make_method(Stella), make_method(StellaPlus)
    for step in range(2):
        stella.step(batch(seed=step))
        plus.step(batch(seed=step))
    full = summarize_buffer(stella.buffer.state_dict())["bytes_per_clip"]
    core = summarize_buffer(plus.buffer.state_dict())["bytes_per_clip"]
    assert 0.49 < core / full < 0.52  # method.md §3.12: ~1.47 MB instead of ~2.93 MB per clip
    assert plus.buffer.fields["core_v"].shape[1:] == (392, 3, 16, 16)
    assert plus.buffer.fields["core_a"].shape[1:] == (256, 1, 16, 16)
    assert "video" not in plus.buffer.fields and "I_v" not in plus.buffer.fields
    # what the methods store is what replay.stella_fields / stella_plus_fields describe (+ the bookkeeping ids)
    sizes = dict(**PAPER_SIZES, patch_size=16, embed_dim=stella.backbone.embed_dim,
                 num_heads=stella.backbone.num_heads)
    for method, spec in ((stella, stella_fields(**sizes)),
                         (plus, stella_plus_fields(**sizes, K_V=plus.K_V, K_A=plus.K_A))):
        stored = {k: (tuple(v.shape[1:]), v.dtype) for k, v in method.buffer.fields.items()}
        assert stored == {**spec, "task": ((), torch.long), "label": ((), torch.long), "index": ((), torch.long)}


def test_finetune_is_the_plain_backbone_objective():
    method = make_method(Finetune, sizes=dict(num_frames=2, image_size=32, target_length=64, num_mel_bins=32))
    losses = method.step(batch(sizes=dict(num_frames=2, image_size=32, target_length=64, num_mel_bins=32)))
    assert set(losses) == {"loss_mae_a", "loss_mae_v", "loss_con"}
    assert not hasattr(method, "buffer") and not hasattr(method, "avm")


def test_frozen_bf16_runs_the_frozen_passes_in_bf16_and_trains_in_fp32():
    """method.stella.frozen_bf16 (speed option, off by default): Steps A-C's frozen passes in bf16, the rest fp32."""
    from stella_cli.config import StellaConfig

    dtypes = {}
    for bf16 in (False, True):
        method = make_method(Stella, stella=StellaConfig(frozen_bf16=bf16))
        seen = []
        for blocks in (method.backbone.blocks_v, method.backbone.blocks_u):  # the matmuls' dtype
            blocks[0].attn.qkv.register_forward_hook(lambda m, inp, out: seen.append((out.dtype, out.requires_grad)))
        for step in range(2):
            losses = method.step(batch(seed=step))
            assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        dtypes[bf16] = {d for d, grad in seen if not grad}, {d for d, grad in seen if grad}
    assert dtypes[False] == ({torch.float32}, {torch.float32})
    assert dtypes[True] == ({torch.bfloat16}, {torch.float32})
