"""model.py: CAV-MAE backbone, masking paths, losses, AVM, checkpoints (tiny sizes; base only on meta or depth 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import stella_cli.checkpoint as C
import stella_cli.model as M
from helpers import authors_keys, fake_mae_state_dict, gen, random_state

from stella_cli.config import MODEL_PRESETS, ModelConfig, resolve_model_preset
from stella_cli.bench import model_summary, parameter_count
from stella_cli.checkpoint import convert_mae, load_authors_checkpoint
from stella_cli.errors import StellaError
from stella_cli.model import AVM, CAVMAE, Classifier, audio_patches, matching_loss, matching_pairs, video_patches

# tiny inputs: 2 frames of 64² -> L_V = 2·4·4 = 32; fbank 128 x 64 -> L_A = 8 time x 4 freq = 32
SIZES = dict(num_frames=2, image_size=64, target_length=128, num_mel_bins=64)
LOSSES = ("loss_mae_a", "loss_mae_v", "loss_con")


def preset(name: str, **overrides) -> ModelConfig:
    return resolve_model_preset(ModelConfig(preset=name, **overrides))


def tiny_model(seed: int = 0, **overrides) -> CAVMAE:
    torch.manual_seed(seed)
    return CAVMAE(preset("tiny", **overrides), **SIZES)


def inputs(B: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 128, 64, generator=g), torch.randn(B, 2, 3, 64, 64, generator=g)


def core_inputs(audio, video, K_a, K_v, seed=3):
    """STELLA-style inputs: random orderings whose first K ids are the core set, core patches cut in that order."""
    g = gen(seed)
    B = audio.shape[0]
    ids_a = torch.stack([torch.randperm(32, generator=g) for _ in range(B)])
    ids_v = torch.stack([torch.randperm(32, generator=g) for _ in range(B)])
    pa = audio_patches(audio, 16)[torch.arange(B)[:, None], ids_a[:, :K_a]]  # (B, K_a, 1, 16, 16)
    pv = video_patches(video, 16)[torch.arange(B)[:, None], ids_v[:, :K_v]]  # (B, K_v, 3, 16, 16)
    return pa, pv, ids_a, ids_v


# ----------------------------------------------------------------------------------------------------------
# the authors' architecture, written out independently from the description (method.md §1, §2, heads.py)


def authors_avm_keys(D) -> dict:
    keys = {f"to_{m}_{t}.weight": (D, D) for m in "va" for t in "qkv"}
    keys.update({"norm_v.weight": (D,), "norm_v.bias": (D,), "norm_a.weight": (D,), "norm_a.bias": (D,),
                 "matching_score.pooler.dense.weight": (2 * D, 2 * D), "matching_score.pooler.dense.bias": (2 * D,),
                 "matching_score.fc.weight": (1, 2 * D), "matching_score.fc.bias": (1,)})
    return keys


def authors_classifier_keys(h, C) -> dict:
    keys = {}
    for prefix in ("pooler.dense", "classifier.0.dense", "fc1", "classifier.1"):
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (h, h), (h,)
    keys.update({"classifier.2.weight": (h,), "classifier.2.bias": (h,),
                 "classifier.4.weight": (C, h), "classifier.4.bias": (C,)})
    return keys


def tiny_authors_keys() -> dict:
    t = MODEL_PRESETS["tiny"]
    return authors_keys(t["embed_dim"], t["decoder_embed_dim"], t["modality_depth"], t["fusion_depth"],
                        t["decoder_depth"], t["mlp_ratio"], L_V=32, L_A=32, p=16)


# ----------------------------------------------------------------------------------------------------------
# sizes


def test_base_parameter_count_equals_the_authors_architecture():
    keys = authors_keys(768, 512, 10, 2, 8, 4.0, L_V=784, L_A=512, p=16)
    expected = sum(math.prod(s) for s in keys.values())
    summary = model_summary(preset("base"))
    assert summary["params"]["backbone"] == expected == 185_534_976
    assert summary["params"]["avm"] == sum(math.prod(s) for s in authors_avm_keys(768).values()) == 5_904_385
    assert summary["params"]["total"] == expected + 5_904_385
    assert sum(summary["params"]["parts"].values()) == expected
    assert summary["params"]["parts"]["fusion layers"] == 2 * (12 * 768**2 + 13 * 768 + 4 * 2 * 768)
    with_head = model_summary(preset("base"), num_classes=309)
    # Pooler dense + fc1 (1536²+1536 each), LayerNorm, Linear to 309 classes (shared modules counted once)
    assert with_head["params"]["classifier"] == 2 * (1536 * 1536 + 1536) + 2 * 1536 + 1536 * 309 + 309


def test_base_and_synthetic_token_counts():
    t = model_summary(preset("base"))["tokens"]
    assert (t["video"], t["audio"], t["visible_video"], t["visible_audio"]) == (784, 512, 156, 102)
    assert (t["decoder_video"], t["decoder_audio"]) == ({"random": 784, "core": 392}, {"random": 512, "core": 256})
    assert (t["targets_video"]["core"], t["targets_audio"]["core"]) == (236, 154)
    s = model_summary(preset("small"), num_frames=4, image_size=64, target_length=384, num_mel_bins=128)["tokens"]
    assert (s["video"], s["audio"], s["visible_video"], s["visible_audio"]) == (64, 192, 12, 38)


def test_base_sequence_lengths_seen_by_each_layer():
    """Base widths and input sizes at depth 1: record what every stage sees, random vs core (ratio 0.5)."""
    torch.manual_seed(0)
    model = CAVMAE(preset("base", modality_depth=1, fusion_depth=1, decoder_depth=1), 4, 224, 1024, 128)
    assert (model.num_video_tokens, model.num_audio_tokens, model.num_freq_tokens) == (784, 512, 8)
    seen = []
    for name in ("blocks_a", "blocks_v", "blocks_u", "decoder_blocks"):
        getattr(model, name)[0].register_forward_hook(lambda m, args, out, n=name: seen.append((n, args[0].shape[1:])))
    audio, video = torch.randn(1, 1, 1024, 128), torch.randn(1, 4, 3, 224, 224)
    with torch.no_grad():
        model(audio, video, generator=gen())
        random = list(seen)
        seen.clear()
        g = gen(1)
        ids_a, ids_v = torch.randperm(512, generator=g)[None], torch.randperm(784, generator=g)[None]
        model(audio_patches(audio, 16)[:, ids_a[0, :256]], video_patches(video, 16)[:, ids_v[0, :392]],
              ids_a, ids_v, generator=gen())
    assert ("blocks_a", (102, 768)) in random and ("blocks_v", (156, 768)) in random
    assert ("blocks_u", (258, 768)) in random  # joint pass over the visible [audio; video]
    assert ("blocks_u", (102, 768)) in random and ("blocks_u", (156, 768)) in random  # contrastive path
    assert [s for n, s in random if n == "decoder_blocks"] == [(512, 512), (784, 512)]
    assert ("blocks_a", (102, 768)) in seen and ("blocks_v", (156, 768)) in seen
    assert [s for n, s in seen if n == "decoder_blocks"] == [(256, 512), (392, 512)]


def test_forward_shapes_and_api_views():
    model = tiny_model()
    audio, video = inputs(B=3)
    out = model(audio, video, generator=gen())
    assert all(out[k].shape == () and out[k].dtype == torch.float32 for k in LOSSES)
    assert out["z_a"].shape == out["z_v"].shape == (3, 64)
    c_a, c_v = model.unimodal_codes(audio, video)
    assert c_a.shape == (3, 32, 64) and c_v.shape == (3, 32, 64)
    e_a, e_v = model.joint_codes(c_a, c_v)
    assert e_a.shape == c_a.shape and e_v.shape == c_v.shape
    assert model.joint_embed(audio, video).shape == (3, 128)
    r_a, r_v = model.retrieval_embed(audio, video)
    assert torch.allclose(r_a.norm(dim=-1), torch.ones(3)) and torch.allclose(r_v.norm(dim=-1), torch.ones(3))
    # no mixing across the batch, no randomness: one clip alone gives the same embedding
    alone_a, alone_v = model.retrieval_embed(audio[1:2], video[1:2])
    assert torch.allclose(alone_a, r_a[1:2], atol=1e-5) and torch.allclose(alone_v, r_v[1:2], atol=1e-5)


def test_bad_inputs_raise_value_errors():
    model = tiny_model()
    audio, video = inputs(B=2)
    with pytest.raises(ValueError, match="video: expected a full input"):
        model(audio, video[:, :1])
    with pytest.raises(ValueError, match="ids_a"):
        model(audio_patches(audio, 16)[:, :16], video, ids_a=torch.zeros(2, 32, dtype=torch.int32))
    with pytest.raises(StellaError, match="visible"):  # core ratio 0.9: 3 core tokens < 6 visible
        pa, pv, ids_a, ids_v = core_inputs(audio, video, 3, 16)
        model(pa, pv, ids_a, ids_v)
    with pytest.raises(ValueError, match="reduction"):
        model(audio, video, reduction="sum")
    with pytest.raises(StellaError, match="not a multiple"):
        CAVMAE(preset("tiny"), 2, 60, 128, 64)


# ----------------------------------------------------------------------------------------------------------
# initialisation (method.md §1.2)


def one_d(dim, pos):
    return [math.sin(pos / 10000 ** (k / (dim / 2))) for k in range(dim // 2)] + \
           [math.cos(pos / 10000 ** (k / (dim / 2))) for k in range(dim // 2)]


def test_initialisation():
    model = tiny_model()
    D = 64
    pos_v, pos_a = model.pos_embed_v[0], model.pos_embed_a[0]
    # video: token t·16 + row·4 + col -> [1-D(col) | 1-D(row)], same for every frame
    expected = torch.tensor(one_d(D // 2, 3) + one_d(D // 2, 2))  # row 2, col 3
    assert torch.allclose(pos_v[0 * 16 + 2 * 4 + 3], expected, atol=1e-6)
    assert torch.equal(pos_v[:16], pos_v[16:]) and torch.equal(model.inter_pos_embed_v, model.pos_embed_v)
    # audio quirk B7: 8 time x 4 freq tokens (t·4 + f) but token n -> [1-D(n mod 8) | 1-D(n // 8)]
    n = 9  # t = 2, f = 1
    assert torch.allclose(pos_a[n], torch.tensor(one_d(D // 2, 1) + one_d(D // 2, 1)), atol=1e-6)
    assert torch.allclose(pos_a[4], torch.tensor(one_d(D // 2, 4) + one_d(D // 2, 0)), atol=1e-6)  # t=1, f=0
    dec = model.decoder_pos_embed_a[0]
    assert dec.shape == (32, 32) and torch.allclose(dec[n], torch.tensor(one_d(16, 1) + one_d(16, 1)), atol=1e-6)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        if isinstance(m, torch.nn.Linear):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    w = model.blocks_a[0].mlp.fc1.weight
    assert 0.017 < w.std().item() < 0.023 and abs(w.mean().item()) < 0.003
    w = model.patch_embed_v.proj.weight.flatten(1)  # xavier on (D, 3·p·p)
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    tokens = torch.cat([model.modality_a.flatten(), model.modality_v.flatten(), model.mask_token_a.flatten(),
                        model.mask_token_v.flatten(), model.decoder_modality_a.flatten()])
    assert 0.012 < tokens.std().item() < 0.028


# ----------------------------------------------------------------------------------------------------------
# masking (method.md §1.5)


def test_modality_guided_masking_counts():
    ids = torch.stack([torch.randperm(784, generator=gen(i)) for i in range(2)])
    pos_vis, is_target = M.modality_guided_masking(ids[:, :392], 156, gen())
    assert pos_vis.shape == (2, 156) and is_target.sum(1).tolist() == [236, 236]
    assert not is_target.gather(1, pos_vis).any()
    assert all(len(set(row.tolist())) == 156 for row in pos_vis)
    # random masking: the authors' argsort of uniform noise, first int(0.2·L) kept
    pos_rand, _ = M.modality_guided_masking(torch.arange(512).expand(2, 512), 102, gen(5))
    assert torch.equal(pos_rand, torch.rand(2, 512, generator=gen(5)).argsort(1)[:, :102])


def masks_of(model, audio, video, ids_a=None, ids_v=None, seed=7):
    with torch.no_grad():
        return model.forward_encoder(audio, video, ids_a, ids_v, gen(seed))


@pytest.mark.parametrize("path", ["random", "core"])
def test_reconstructs_only_target_tokens(path):
    model = tiny_model()
    audio, video = inputs(B=2)
    if path == "random":
        args = (audio, video, None, None)
    else:
        pa, pv, ids_a, ids_v = core_inputs(audio, video, 16, 16)
        args = (pa, pv, ids_a, ids_v)
    a, v = masks_of(model, *args)
    base = model(*args, generator=gen())
    assert v.is_target.sum(1).tolist() == ([26, 26] if path == "random" else [10, 10])  # N - int(32·0.2)

    noise = torch.randn(3, 16, 16, generator=gen(11))  # not a constant: targets are normalised per patch

    def perturbed(pos):
        x = args[1].clone()
        if path == "random":  # a patch of the full video: frame, row, col of token id `pos`
            f, r, c = pos // 16, (pos % 16) // 4, pos % 4
            x[0, f, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += noise
        else:
            x[0, pos] += noise
        return model(args[0], x, *args[2:], generator=gen())

    target = int(v.is_target[0].nonzero()[0])
    visible = int(v.pos_vis[0, 0])
    out = perturbed(target)  # a target is never an encoder input: only its own reconstruction term moves
    assert not torch.allclose(out["loss_mae_v"], base["loss_mae_v"])
    for k in ("loss_mae_a", "loss_con", "z_a", "z_v"):
        assert torch.equal(out[k], base[k]), k
    out = perturbed(visible)  # a visible token feeds the encoder
    assert not torch.allclose(out["z_v"], base["z_v"])

    # the loss equals an independent recomputation from the predicted target tokens
    preds = []
    hook = model.mae_score_video.register_forward_hook(lambda m, i, o: preds.append(o))
    loss = model(*args, generator=gen())["loss_mae_v"]
    hook.remove()
    patches = v.patches.permute(0, 1, 3, 4, 2).flatten(2)  # (B, N, 768) in (row, col, channel) order
    terms = []
    for b in range(2):
        t = patches[b][v.is_target[b]]
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        terms.append(((preds[0][b] - t) ** 2).mean(-1))
    assert torch.allclose(loss, torch.cat(terms).mean(), atol=1e-6)


def test_core_path_ignores_non_core_tokens():
    model = tiny_model()
    audio, video = inputs(B=2)
    pa, pv, ids_a, ids_v = core_inputs(audio, video, 16, 16)
    a, v = masks_of(model, pa, pv, ids_a, ids_v)
    out = model(pa, pv, ids_a, ids_v, generator=gen())
    sum(out[k] for k in LOSSES).backward()
    for ids, m, pos, dec in ((ids_v, v, model.pos_embed_v, model.decoder_pos_embed_v),
                             (ids_a, a, model.pos_embed_a, model.decoder_pos_embed_a)):
        core = torch.zeros(32, dtype=torch.bool)
        core[ids[:, :16].flatten()] = True
        visible = torch.zeros(32, dtype=torch.bool)
        visible[ids[:, :16].gather(1, m.pos_vis).flatten()] = True
        row_grad = dec.grad[0].abs().sum(-1)
        assert (row_grad[~core] == 0).all() and (row_grad[core] > 0).all()  # decoder: core tokens only
        row_grad = pos.grad[0].abs().sum(-1)
        assert (row_grad[~visible] == 0).all() and (row_grad[visible] > 0).all()  # encoder: visible only


def test_compressed_masking_with_every_patch_kept_equals_random_masking(monkeypatch):
    """K = L.  With ordering π and shuffle σ (drawn from the generator), the compressed path shows tokens
    π[σ[:n]] and reconstructs π[σ[n:]]: exactly random masking whose shuffle is π∘σ.  (π = identity: the same
    draw gives bit-identical results.)"""
    model = tiny_model()
    audio, video = inputs(B=2)
    full = model(audio, video, generator=gen())
    ident = torch.arange(32).expand(2, 32)
    same = model(audio_patches(audio, 16), video_patches(video, 16), ident, ident, generator=gen())
    for k in full:
        assert torch.equal(full[k], same[k]), k

    pa, pv, ids_a, ids_v = core_inputs(audio, video, 32, 32)
    compressed = model(pa, pv, ids_a, ids_v, generator=gen())
    orderings = iter([ids_a, ids_v])  # audio is masked first, then video
    original = M.shuffle
    monkeypatch.setattr(M, "shuffle", lambda B, N, device, g: next(orderings).gather(1, original(B, N, device, g)))
    composed = model(audio, video, generator=gen())
    for k in full:
        assert torch.allclose(compressed[k], composed[k], atol=1e-5), k
    assert not torch.allclose(compressed["loss_mae_v"], full["loss_mae_v"])  # the ordering does matter


# ----------------------------------------------------------------------------------------------------------
# losses and gradients


def test_reduction_none_matches_mean():
    model = tiny_model()
    audio, video = inputs(B=4)
    mean = model(audio, video, generator=gen())
    each = model(audio, video, reduction="none", generator=gen())
    for k in LOSSES:
        assert each[k].shape == (4,) and torch.allclose(each[k].mean(), mean[k], atol=1e-6), k
    z_a = mean["z_a"].detach()
    manual = M.info_nce(z_a, mean["z_v"].detach(), 0.05) * 0.1
    assert torch.allclose(manual, mean["loss_con"])
    a, v = F.normalize(z_a, dim=-1), F.normalize(mean["z_v"].detach(), dim=-1)
    s = v @ a.T / 0.05
    by_hand = 0.1 * (-(s.log_softmax(1).diag().mean()) - (s.T.log_softmax(1).diag().mean())) / 2
    assert torch.allclose(by_hand, mean["loss_con"], atol=1e-6)


def waves(shape, g):
    """Random plane waves: patches with structure a tiny MAE can learn (white noise cannot be predicted)."""
    *lead, H, W = shape
    fy, fx, phase = (torch.rand(*lead, 1, 1, generator=g) * s for s in (0.3, 0.3, 6.28))
    return torch.sin(fy * torch.arange(H).view(H, 1) + fx * torch.arange(W).view(1, W) + phase)


def test_loss_decreases_on_a_tiny_batch():
    model = tiny_model()
    audio, video = waves((4, 1, 128, 64), gen(1)), waves((4, 2, 3, 64, 64), gen(2))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    history = []
    for _ in range(30):
        out = model(audio, video, generator=gen())  # same masks every step
        loss = sum(out[k] for k in LOSSES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: out[k].item() for k in LOSSES})
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.75 * sum(first.values())
    assert all(last[k] < 0.9 * first[k] for k in LOSSES), (first, last)


def grads(model, loss) -> tuple[set, set]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return reached, {n for n, _ in model.named_parameters()} - reached


def test_gradients_reach_exactly_the_expected_parameters():
    model = tiny_model()
    audio, video = inputs(B=3)
    names = {n for n, _ in model.named_parameters()}
    modality_norms = {n for n in names if n.startswith(("norm_a.", "norm_v.")) or ".norm1_" in n or ".norm2_" in n}
    shared_fusion_norms = {n for n in names if n.startswith("blocks_u.") and (".norm1." in n or ".norm2." in n)}
    decoder = {n for n in names if n.startswith(("decoder", "mask_token", "mae_score", "norm."))}

    def run(*keys):
        out = model(audio, video, generator=gen())
        return grads(model, sum(out[k] for k in keys))

    reached, none = run(*LOSSES)
    assert none == set()
    reached, none = run("loss_con")  # modality path only
    assert none == decoder | shared_fusion_norms
    reached, none = run("loss_mae_a", "loss_mae_v")  # joint path only
    assert none == modality_norms
    reached, none = run("loss_mae_a")  # the video encoder is reached through the joint fusion layers
    video_decoder = {"mae_score_video.decoder.weight", "mae_score_video.decoder.bias", "mask_token_v",
                     "decoder_pos_embed_v", "decoder_modality_v"}
    assert none == modality_norms | video_decoder
    assert {"blocks_v.0.attn.qkv.weight", "patch_embed_v.proj.weight"} <= reached

    # matching loss: only the AVM learns; the backbone pass is frozen
    avm = AVM(64, 4)
    c_a, c_v = model.unimodal_codes(audio, video)
    model.zero_grad(set_to_none=True)
    matching_loss(model, avm, c_a, c_v, gen()).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in avm.parameters())


def test_autocast_bf16_keeps_losses_in_float32():
    model = tiny_model()
    audio, video = inputs(B=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(audio, video, generator=gen())
        avm_loss = matching_loss(model, AVM(64, 4), *model.unimodal_codes(audio, video), gen())
    assert all(out[k].dtype == torch.float32 and torch.isfinite(out[k]).all() for k in (*LOSSES, "z_a"))
    assert avm_loss.dtype == torch.float32
    sum(out[k] for k in LOSSES).backward()
    ref = model(audio, video, generator=gen())
    assert torch.allclose(out["loss_mae_v"], ref["loss_mae_v"], rtol=0.05)


# ----------------------------------------------------------------------------------------------------------
# AVM (method.md §2)


def test_avm_logits_and_reshape_option():
    torch.manual_seed(0)
    faithful, fixed = AVM(64, 4), AVM(64, 4, fix_head_reshape=True)
    fixed.load_state_dict(faithful.state_dict())
    g = gen()
    e_a, e_v = torch.randn(3, 12, 64, generator=g), torch.randn(3, 20, 64, generator=g)
    out = faithful.attention_logits(e_a, e_v)
    assert out["S_av"].shape == (3, 4, 12, 20) and out["S_va"].shape == (3, 4, 20, 12)
    q_a = (F.layer_norm(e_a, (64,)) @ faithful.to_a_q.weight.T).view(3, 12, 4, 16).permute(0, 2, 1, 3)
    k_v = (F.layer_norm(e_v, (64,)) @ faithful.to_v_k.weight.T).view(3, 20, 4, 16).permute(0, 2, 1, 3)
    q_v = (F.layer_norm(e_v, (64,)) @ faithful.to_v_q.weight.T).view(3, 20, 4, 16).permute(0, 2, 1, 3)
    k_a = (F.layer_norm(e_a, (64,)) @ faithful.to_a_k.weight.T).view(3, 12, 4, 16).permute(0, 2, 1, 3)
    assert torch.allclose(out["q_a"], q_a, atol=1e-6) and torch.allclose(out["k_v"], k_v, atol=1e-6)
    assert torch.allclose(out["S_av"], torch.einsum("bhid,bhjd->bhij", q_a, k_v) / 4, atol=1e-5)
    assert torch.allclose(out["S_va"], torch.einsum("bhjd,bhid->bhji", q_v, k_a) / 4, atol=1e-5)

    # forward, written out: attention with the heads merged properly (fixed) or reshaped raw (faithful, B6)
    v_v = (F.layer_norm(e_v, (64,)) @ faithful.to_v_v.weight.T).view(3, 20, 4, 16).permute(0, 2, 1, 3)
    v_a = (F.layer_norm(e_a, (64,)) @ faithful.to_a_v.weight.T).view(3, 12, 4, 16).permute(0, 2, 1, 3)
    x_a = out["S_av"].softmax(-1) @ v_v  # (3, 4, 12, 16)
    x_v = out["S_va"].softmax(-1) @ v_a  # (3, 4, 20, 16)
    head = faithful.matching_score
    proper = head(torch.cat([x_v.transpose(1, 2).reshape(3, 20, 64).mean(1),
                             x_a.transpose(1, 2).reshape(3, 12, 64).mean(1)], -1)).squeeze(-1)
    raw = head(torch.cat([x_v.reshape(3, 20, 64).mean(1), x_a.reshape(3, 12, 64).mean(1)], -1)).squeeze(-1)
    assert fixed(e_a, e_v).shape == faithful(e_a, e_v).shape == (3,)
    assert torch.allclose(fixed(e_a, e_v), proper, atol=1e-5)
    assert torch.allclose(faithful(e_a, e_v), raw, atol=1e-5)
    assert not torch.allclose(fixed(e_a, e_v), faithful(e_a, e_v), atol=1e-4)


def test_matching_pairs():
    for B in (3, 7, 12):
        labels, video = matching_pairs(B, gen(B))
        assert labels.sum().item() == B // 2
        pos, neg = labels == 1, labels == 0
        assert torch.equal(video[pos], torch.arange(B)[pos])  # positives keep their own video
        assert (video[neg] != torch.arange(B)[neg]).all()  # derangement: no fixed point
        assert sorted(video[neg].tolist()) == torch.arange(B)[neg].tolist()  # a permutation of the negatives
    for B in (1, 2):
        labels, video = matching_pairs(B, gen())
        assert labels.tolist() == [1.0] * B and video.tolist() == list(range(B))
    assert all(torch.equal(x, y) for x, y in zip(matching_pairs(9, gen(3)), matching_pairs(9, gen(3))))
    draws = {tuple(matching_pairs(9, gen(s))[1].tolist()) for s in range(6)}
    assert len(draws) > 1

    model, avm = tiny_model(), AVM(64, 4)
    audio, video_in = inputs(B=5)
    c_a, c_v = model.unimodal_codes(audio, video_in)
    loss = matching_loss(model, avm, c_a, c_v, gen(4))
    labels, index = matching_pairs(5, gen(4))
    logits = avm(*model.joint_codes(c_a, c_v[index]))
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, labels), atol=1e-6)


def test_matching_loss_reusing_the_scoring_joint_pass_is_bit_identical():
    """STELLA passes its Step B joint pass (unswapped codes): the positives come from it, only the negatives run the
    fusion layers again, and the loss and the AVM's gradients are the same to the last bit."""
    model, avm = tiny_model(), AVM(64, 4)
    c_a, c_v = model.unimodal_codes(*inputs(B=5))
    c_a, c_v = c_a.detach(), c_v.detach()
    with torch.no_grad():
        joint = model.joint_codes(c_a, c_v)
    rows = []
    model.blocks_u[0].register_forward_hook(lambda m, inp, out: rows.append(out.shape[0]))
    results = []
    for shared in (None, joint):
        avm.zero_grad()
        loss = matching_loss(model, avm, c_a, c_v, gen(4), joint=shared)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in avm.parameters()]))
    assert rows == [5, 5 - 5 // 2]  # a full second pass before; now the 3 negatives only
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    rows.clear()
    matching_loss(model, avm, c_a[:2], c_v[:2], gen(4), joint=(joint[0][:2], joint[1][:2]))
    assert rows == []  # B <= 2: every row is a positive, no second pass at all


def test_classifier_head():
    torch.manual_seed(0)
    head = Classifier(128, 5)
    assert set(head.state_dict()) == set(authors_classifier_keys(128, 5))
    assert parameter_count(head) == 4 * (128 * 128 + 128) // 2 + 2 * 128 + 128 * 5 + 5
    model = tiny_model()
    assert head(model.joint_embed(*inputs(B=2))).shape == (2, 5)


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def test_authors_state_dict_loads_strictly():
    model = tiny_model()
    keys = tiny_authors_keys()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    sd = random_state(keys, "module.backbone.transformer.", 1)
    sd.update(random_state(authors_avm_keys(64), "module.avmatching_module.", 2))
    report = load_authors_checkpoint(model, {"model": sd})
    assert report == {"loaded": len(keys), "missing": [], "unexpected": [], "skipped": 14}  # the AVM's keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd["module.backbone.transformer." + k]), k
    avm = AVM(64, 4)
    assert C.load_avm_checkpoint(avm, sd)["loaded"] == 14
    assert torch.equal(avm.to_a_q.weight, sd["module.avmatching_module.to_a_q.weight"])
    head = Classifier(128, 5)
    cls = random_state(authors_classifier_keys(128, 5), "module.backbone.transformer.vacls_classifier.", 3)
    assert load_authors_checkpoint(head, cls)["missing"] == []

    broken = dict(sd)
    del broken["module.backbone.transformer.blocks_u.0.norm1_v.weight"]
    with pytest.raises(StellaError, match="blocks_u.0.norm1_v.weight"):
        load_authors_checkpoint(tiny_model(), broken)
    report = load_authors_checkpoint(tiny_model(), broken, strict=False)
    assert report["missing"] == ["blocks_u.0.norm1_v.weight"]
    broken["module.backbone.transformer.blocks_u.0.norm1_v.weight"] = torch.zeros(65)
    with pytest.raises(StellaError, match=r"blocks_u.0.norm1_v.weight has shape \(65,\)"):
        load_authors_checkpoint(tiny_model(), broken)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=0)
    audio, video = inputs(B=2)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    other = tiny_model(seed=5)
    assert not torch.equal(other.blocks_a[0].attn.qkv.weight, model.blocks_a[0].attn.qkv.weight)
    report = load_authors_checkpoint(other, path)
    assert report["missing"] == report["unexpected"] == []
    before, after = model(audio, video, generator=gen()), other(audio, video, generator=gen())
    for k in before:
        assert torch.equal(before[k], after[k]), k
    with pytest.raises(StellaError, match="nope.pth"):
        load_authors_checkpoint(other, tmp_path / "nope.pth")


def test_convert_mae(tmp_path):
    mae = fake_mae_state_dict()
    src, dst = tmp_path / "mae.pth", tmp_path / "out" / "cav.pth"
    torch.save({"model": mae}, src)
    report = convert_mae(src, dst, num_frames=2, target_length=128, num_mel_bins=64, modality_depth=1)
    assert report["sizes"]["depth"] == 2 and report["sizes"]["image_size"] == 64
    model = tiny_model(seed=3)
    assert load_authors_checkpoint(model, dst)["missing"] == []
    sd = model.state_dict()
    for k in ("attn.qkv.weight", "mlp.fc2.bias", "norm1.weight"):
        assert torch.equal(sd[f"blocks_a.0.{k}"], mae[f"blocks.0.{k}"]) and torch.equal(sd[f"blocks_v.0.{k}"], mae[f"blocks.0.{k}"])
        assert torch.equal(sd[f"blocks_u.0.{k}"], mae[f"blocks.1.{k}"])
    for m in ("a", "v"):
        assert torch.equal(sd[f"blocks_u.0.norm1_{m}.weight"], mae["blocks.1.norm1.weight"])
        assert torch.equal(sd[f"blocks_u.0.norm2_{m}.bias"], mae["blocks.1.norm2.bias"])
        assert torch.equal(sd[f"norm_{m}.weight"], mae["norm.weight"])
        assert torch.equal(sd[f"mask_token_{m}"], mae["mask_token"])
    assert torch.equal(sd["norm.bias"], mae["norm.bias"])
    assert torch.equal(sd["pos_embed_v"], torch.cat([mae["pos_embed"][:, 1:]] * 2, dim=1))
    assert torch.equal(sd["inter_pos_embed_v"], sd["pos_embed_v"])
    assert torch.equal(sd["decoder_pos_embed_v"], torch.cat([mae["decoder_pos_embed"][:, 1:]] * 2, dim=1))
    assert torch.allclose(sd["patch_embed_a.proj.weight"][:, 0], mae["patch_embed.proj.weight"].sum(1))
    assert torch.equal(sd["patch_embed_v.proj.weight"], mae["patch_embed.proj.weight"])
    assert torch.equal(sd["mae_score_audio.decoder.weight"], mae["decoder_pred.weight"][:256])
    assert torch.equal(sd["mae_score_video.decoder.bias"], mae["decoder_pred.bias"])
    for k in ("decoder_embed.weight", "decoder_blocks.0.attn.proj.weight", "decoder_norm.bias"):
        assert torch.equal(sd[k], mae[k])
    for k in C.MAE_UNMAPPED:  # faithful: the authors' script leaves these at the constructor's zeros
        assert not sd[k].any(), k
    model(*inputs(B=2), generator=gen())  # the converted weights run

    convert_mae(src, dst, num_frames=2, target_length=128, num_mel_bins=64, modality_depth=1, faithful_zeros=False)
    load_authors_checkpoint(model, dst)
    assert model.pos_embed_a.abs().sum() > 0
    del mae["decoder_pred.weight"]
    torch.save(mae, src)
    with pytest.raises(StellaError, match="decoder_pred.weight"):
        convert_mae(src, dst, num_frames=2, target_length=128, num_mel_bins=64, modality_depth=1)
    with pytest.raises(StellaError, match="missing.pth"):
        convert_mae(tmp_path / "missing.pth", dst)
