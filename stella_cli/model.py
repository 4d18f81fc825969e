"""The networks of the authors' code: the CAV-MAE two-stream backbone, the AVM and the Classifier, with their losses.

The paper's notation (docs/method.md; paper defaults in brackets):
    B    batch                      D    encoder width [768]          H    heads [12]    d_h  head width [64]
    F    frames per clip [4]        S    frame side [224]             p    patch side [16]
    T    fbank frames [1024]        M    mel bins [128]
    L_V  video tokens = F·(S/p)² [784], layout  t·(S/p)² + row·(S/p) + col   (frame-major, per-frame 2-D patches)
    L_A  audio tokens = (T/p)·(M/p) [512], layout  t·(M/p) + f               (time-major)
    K_V, K_A  core tokens kept by STELLA's selection [392, 256]

Attribute names equal the authors' `models/cav.py`, `models/avm_module.py` and `models/heads.py`, so their state
dicts load key for key (checkpoint.load_authors_checkpoint). Masks follow MAE: True = removed / reconstruction target.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_cli.config import ModelConfig, token_counts
from stella_cli.distributed import gather_with_grad, rank_world
from stella_cli.errors import StellaError


def video_patches(video: Tensor, p: int) -> Tensor:
    """Cut frames into patches in token order.  video: (B, F, 3, S, S) -> (B, L_V, 3, p, p)."""
    B, F, C, S, _ = video.shape
    g = S // p
    x = video.reshape(B, F, C, g, p, g, p)  # (B, F, C, row, p, col, p)
    x = x.permute(0, 1, 3, 5, 2, 4, 6)  # (B, F, row, col, C, p, p)
    return x.reshape(B, F * g * g, C, p, p)  # (B, L_V, C, p, p)


def audio_patches(audio: Tensor, p: int) -> Tensor:
    """Cut a fbank into patches in token order.  audio: (B, 1, T, M) -> (B, L_A, 1, p, p), patch = (time, freq)."""
    B, C, T, M = audio.shape
    x = audio.reshape(B, C, T // p, p, M // p, p)  # (B, 1, t, p, f, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, t, f, 1, p, p)
    return x.reshape(B, (T // p) * (M // p), C, p, p)  # (B, L_A, 1, p, p)


# ----------------------------------------------------------------------------------------------------------
# positional tables (method.md §1.2)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[sin(pos·ω), cos(pos·ω)] with ω_k = 10000^(-k/(dim/2)), in float64 like the authors' numpy.  -> (n, dim)"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angle = pos.double()[:, None] * omega[None]  # (n, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=1)  # (n, dim)


def sincos_2d(dim: int, num_tokens: int, width: int) -> Tensor:
    """Token n gets [1-D(n mod width) | 1-D(n // width)] (the authors' raw reshape of the meshgrid).  -> (n, dim)

    Video frames: width = S/p, the usual MAE table (col | row).  Audio: width = T/p (64) although the tokens are
    time-major t·(M/p) + f, so the halves do not encode (t, f).  # faithful: method.md §9.3 B7, inherited from CAV-MAE.
    """
    n = torch.arange(num_tokens)
    return torch.cat([sincos_1d(dim // 2, n % width), sincos_1d(dim // 2, n // width)], dim=1).float()


# ----------------------------------------------------------------------------------------------------------
# blocks (method.md §1.3); module and attribute names follow the authors' checkpoints


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape  # batch, tokens, width
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, H, d_h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d_h) each
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√d_h)·v: (B, H, N, d_h)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block.  modality_norms=True adds the fusion layers' audio-only (norm1_a, norm2_a) and
    video-only (norm1_v, norm2_v) LayerNorm sets; attention and MLP weights are shared by all three modes."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, modality_norms: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if modality_norms:
            self.norm1_a, self.norm2_a = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.norm1_v, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, modality: str = "") -> Tensor:
        """modality "" = joint / shared norms, "a" = audio alone, "v" = video alone (method.md §1.3)."""
        if modality == "a":
            norm1, norm2 = self.norm1_a, self.norm2_a
        elif modality == "v":
            norm1, norm2 = self.norm1_v, self.norm2_v
        else:
            norm1, norm2 = self.norm1, self.norm2
        x = x + self.attn(norm1(x))
        return x + self.mlp(norm2(x))


class PatchEmbed(nn.Module):
    """Conv2d(C, D, p, stride p) applied to pre-cut patches, which equals the conv on the whole image."""

    def __init__(self, in_chans: int, dim: int, p: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=p, stride=p)

    def forward(self, patches: Tensor) -> Tensor:
        """patches: (B, N, C, p, p) -> tokens (B, N, D)."""
        return F.linear(patches.flatten(2), self.proj.weight.flatten(1), self.proj.bias)


class MAEHead(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.decoder = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(x)


def init_linear_and_norm(m: nn.Module) -> None:
    """Linear N(0, 0.02) with zero bias; LayerNorm (1, 0) (cav.py `_init_weights`, objectives.init_weights)."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def weight_decay_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                        skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Optimiser groups as the authors' `get_parameter_groups` (optimizers/builder.py): no decay for 1-D tensors
    (biases, LayerNorm weights), names ending in `.bias` and the names in `skip`; `weight_decay` on the rest.
    Parameters that do not require grad are left out."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            plain = param.ndim <= 1 or name.endswith(".bias") or name in skip
            (no_decay if plain else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------
# masking (method.md §1.5)


class Masked(NamedTuple):
    """One modality after masking.  N = L (full input) or K (core patches); n = visible tokens."""

    x: Tensor  # (B, n, D) visible tokens after the modality layers and the intermediate pos-embed
    patches: Tensor  # (B, N, C, p, p) the input patches, source of the MAE targets
    ids: Tensor  # (B, N) long: token id of each input patch
    pos_vis: Tensor  # (B, n) long: positions (into N) of the visible tokens
    is_target: Tensor  # (B, N) bool: True = reconstruction target


def lookup(table: Tensor, ids: Tensor) -> Tensor:
    """Rows `ids` (B, N) of a (1, L, D) embedding table -> (B, N, D).

    F.embedding instead of `table[0, ids]`: the backward of advanced indexing (index_put_ with accumulate) sums
    in a thread-dependent order on CPU, which breaks bit-exact resume; embedding's backward does not.
    """
    return F.embedding(ids, table[0])  # (B, N, D)


def shuffle(B: int, N: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Per-sample random order: argsort of uniform noise (cav.py `random_masking`).  -> (B, N) long"""
    return torch.rand(B, N, device=device, generator=generator).argsort(dim=1)


def modality_guided_masking(ids: Tensor, n_vis: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """method.md §1.5: shuffle the N input tokens (the core set), the first n_vis are visible, the rest are targets.

    ids: (B, N) token ids of the input tokens.  Returns pos_vis (B, n_vis) long, is_target (B, N) bool.
    Random masking is the case N = L, ids = 0..L-1: the authors' `random_masking` (same noise, same argsort).
    Non-core tokens are never inputs, so they are neither visible nor targets.
    """
    B, N = ids.shape
    if not 0 < n_vis < N:
        raise StellaError(f"masking keeps {n_vis} visible tokens of {N} inputs: need 0 < visible < inputs "
                          f"(lower the core ratio or the mask ratio)")
    pos_vis = shuffle(B, N, ids.device, generator)[:, :n_vis]  # (B, n_vis)
    is_target = torch.ones(B, N, dtype=torch.bool, device=ids.device).scatter(1, pos_vis, False)  # (B, N)
    return pos_vis, is_target


# ----------------------------------------------------------------------------------------------------------
# contrastive loss and the cross-rank gather (method.md §1.7)


def info_nce(z_a: Tensor, z_v: Tensor, tau: float, reduction: str = "mean", remote_grad: bool = True) -> Tensor:
    """Symmetric InfoNCE (method.md §1.7), in float32.  z_a, z_v: (B, D) un-normalised pooled embeddings.

    L_i = ½(-log softmax_j(ẑ_v,i·ẑ_a,j/τ)[i] - log softmax_j(ẑ_a,i·ẑ_v,j/τ)[i]), j over the batch of all ranks,
    anchors i over the local batch.  Returns the mean, or (B,) for reduction="none".
    remote_grad: see gather_with_grad (model.faithful_contrast_grad = not remote_grad).
    """
    with torch.autocast(z_a.device.type, enabled=False):
        a, v = F.normalize(z_a.float(), dim=-1), F.normalize(z_v.float(), dim=-1)  # (B, D)
        a_all, v_all = gather_with_grad(a, remote_grad), gather_with_grad(v, remote_grad)  # (W·B, D)
        rank, _ = rank_world()
        labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]  # (B,)
        nce_va = F.cross_entropy(v @ a_all.T / tau, labels, reduction="none")  # (B,)
        nce_av = F.cross_entropy(a @ v_all.T / tau, labels, reduction="none")  # (B,)
        loss = (nce_va + nce_av) / 2
    return loss if reduction == "none" else loss.mean()


# ----------------------------------------------------------------------------------------------------------
# the backbone


class CAVMAE(nn.Module):
    """Two-stream audio-video masked autoencoder (method.md §1): modality layers, fusion layers, a decoder per
    modality."""

    def __init__(self, cfg: ModelConfig, num_frames: int, image_size: int, target_length: int, num_mel_bins: int):
        super().__init__()
        unset = [k for k in ("embed_dim", "num_heads", "modality_depth", "fusion_depth", "decoder_embed_dim",
                             "decoder_depth", "decoder_num_heads", "mlp_ratio") if getattr(cfg, k) is None]
        if unset:
            raise ValueError(f"model.{unset[0]} is None: resolve the preset first (config.resolve_model_preset)")
        p, D, Dd, r = cfg.patch_size, cfg.embed_dim, cfg.decoder_embed_dim, cfg.mlp_ratio
        for name, size in (("data.image_size", image_size), ("data.target_length", target_length),
                           ("data.num_mel_bins", num_mel_bins)):
            if size % p:
                raise StellaError(f"{name}={size} is not a multiple of model.patch_size={p}")
        if D % cfg.num_heads or Dd % cfg.decoder_num_heads:
            raise StellaError(f"model.embed_dim={D} / decoder_embed_dim={Dd} not divisible by their head counts")
        self.patch_size, self.embed_dim, self.num_heads, self.num_frames = p, D, cfg.num_heads, num_frames
        self.grid = image_size // p  # S/p
        self.num_time_tokens, self.num_freq_tokens = target_length // p, num_mel_bins // p
        self.num_video_tokens, self.num_audio_tokens = token_counts(num_frames, image_size, target_length,
                                                                    num_mel_bins, p)  # L_V, L_A
        self.mask_ratio_a, self.mask_ratio_v = cfg.mask_ratio_a, cfg.mask_ratio_v
        self.norm_pix_loss, self.mae_weight = cfg.norm_pix_loss, cfg.mae_weight
        self.contrast_tau, self.contrast_weight = cfg.contrast_tau, cfg.contrast_weight
        self.contrast_remote_grad = not cfg.faithful_contrast_grad
        L_V, L_A = self.num_video_tokens, self.num_audio_tokens

        # encoder specifics
        self.patch_embed_v, self.patch_embed_a = PatchEmbed(3, D, p), PatchEmbed(1, D, p)
        self.pos_embed_v = nn.Parameter(torch.zeros(1, L_V, D))  # learnable, sin-cos init
        self.inter_pos_embed_v = nn.Parameter(torch.zeros(1, L_V, D))  # added before the fusion layers
        self.pos_embed_a = nn.Parameter(torch.zeros(1, L_A, D))
        self.inter_pos_embed_a = nn.Parameter(torch.zeros(1, L_A, D))
        self.modality_v, self.modality_a = nn.Parameter(torch.zeros(1, 1, D)), nn.Parameter(torch.zeros(1, 1, D))
        self.blocks_v = nn.ModuleList([Block(D, cfg.num_heads, r) for _ in range(cfg.modality_depth)])
        self.blocks_a = nn.ModuleList([Block(D, cfg.num_heads, r) for _ in range(cfg.modality_depth)])
        self.blocks_u = nn.ModuleList([Block(D, cfg.num_heads, r, modality_norms=True)
                                       for _ in range(cfg.fusion_depth)])
        self.norm, self.norm_a, self.norm_v = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)

        # decoder specifics
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token_v, self.mask_token_a = nn.Parameter(torch.zeros(1, 1, Dd)), nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_v = nn.Parameter(torch.zeros(1, L_V, Dd))
        self.decoder_pos_embed_a = nn.Parameter(torch.zeros(1, L_A, Dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_blocks = nn.ModuleList([Block(Dd, cfg.decoder_num_heads, r) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd)
        self.mae_score_audio = MAEHead(Dd, p * p)
        self.mae_score_video = MAEHead(Dd, p * p * 3)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """method.md §1.2: sin-cos tables (repeated per frame), xavier patch embeddings, N(0, 0.02) tokens."""
        with torch.no_grad():
            for param in (self.pos_embed_v, self.inter_pos_embed_v, self.decoder_pos_embed_v):
                frame = sincos_2d(param.shape[-1], self.grid**2, self.grid)  # (S/p · S/p, dim)
                param.copy_(frame.repeat(self.num_frames, 1)[None])  # same table for every frame: (1, L_V, dim)
            for param in (self.pos_embed_a, self.inter_pos_embed_a, self.decoder_pos_embed_a):
                param.copy_(sincos_2d(param.shape[-1], self.num_audio_tokens, self.num_time_tokens)[None])
        for embed in (self.patch_embed_v, self.patch_embed_a):  # like nn.Linear on the flattened kernel
            nn.init.xavier_uniform_(embed.proj.weight.view(embed.proj.weight.shape[0], -1))
        for token in (self.modality_v, self.modality_a, self.mask_token_v, self.mask_token_a,
                      self.decoder_modality_v, self.decoder_modality_a):
            nn.init.normal_(token, std=0.02)
        self.apply(init_linear_and_norm)

    def no_weight_decay(self) -> set[str]:
        """Parameters the authors exclude from weight decay (cav.py:263-266), besides 1-D ones and biases."""
        return {"pos_embed_v", "pos_embed_a", "inter_pos_embed_v", "inter_pos_embed_a", "modality_v", "modality_a",
                "decoder_modality_v", "decoder_modality_a", "mask_token_v", "mask_token_a", "decoder_pos_embed_v",
                "decoder_pos_embed_a"}

    # -- embeddings ------------------------------------------------------------------------------------

    def input_patches(self, x: Tensor, ids: Tensor | None, modality: str) -> tuple[Tensor, Tensor]:
        """Full input, or pre-cut core patches in `ids` order (method.md §1.5).

        -> patches (B, N, C, p, p), ids (B, N)."""
        p, B = self.patch_size, x.shape[0]
        if modality == "v":
            name, L, C, cut = "video", self.num_video_tokens, 3, video_patches
            full = (self.num_frames, 3, self.grid * p, self.grid * p)
        else:
            name, L, C, cut = "audio", self.num_audio_tokens, 1, audio_patches
            full = (1, self.num_time_tokens * p, self.num_freq_tokens * p)
        if ids is None:
            if tuple(x.shape[1:]) != full:
                raise ValueError(f"{name}: expected a full input (B, {', '.join(map(str, full))}), "
                                 f"got {tuple(x.shape)}")
            return cut(x, p), torch.arange(L, device=x.device).expand(B, L)
        if tuple(ids.shape) != (B, L) or ids.dtype != torch.long:
            raise ValueError(f"ids_{modality}: expected a long ordering of shape ({B}, {L}), "
                             f"got {tuple(ids.shape)} {ids.dtype}")
        if x.dim() != 5 or tuple(x.shape[2:]) != (C, p, p) or x.shape[1] > L:
            raise ValueError(f"{name}: with ids_{modality}, expected core patches (B, K<={L}, {C}, {p}, {p}), "
                             f"got {tuple(x.shape)}")
        return x, ids[:, : x.shape[1]]

    def embed(self, patches: Tensor, ids: Tensor, modality: str) -> Tensor:
        """Patch + modality + positional embedding of the tokens `ids`.  -> (B, N, D)"""
        if modality == "v":
            return self.patch_embed_v(patches) + self.modality_v + lookup(self.pos_embed_v, ids)
        return self.patch_embed_a(patches) + self.modality_a + lookup(self.pos_embed_a, ids)

    def unimodal_codes(self, audio: Tensor, video: Tensor) -> tuple[Tensor, Tensor]:
        """Full inputs through the modality layers, no masking (method.md §1.4 "inter").

        -> c_a (B, L_A, D), c_v (B, L_V, D): before the intermediate pos-embed.
        """
        x_a = self.embed(*self.input_patches(audio, None, "a"), "a")
        x_v = self.embed(*self.input_patches(video, None, "v"), "v")
        for blk in self.blocks_a:
            x_a = blk(x_a)
        for blk in self.blocks_v:
            x_v = blk(x_v)
        return x_a, x_v

    def joint_codes(self, c_a: Tensor, c_v: Tensor) -> tuple[Tensor, Tensor]:
        """Codes + intermediate pos-embed, [audio; video] through the fusion layers with the shared norms.

        method.md §1.4 "codes": returns e_a (B, L_A, D), e_v (B, L_V, D) before the final `norm` (the AVM inputs).
        """
        L_A = c_a.shape[1]
        x = torch.cat([c_a + self.inter_pos_embed_a, c_v + self.inter_pos_embed_v], dim=1)  # (B, L_A + L_V, D)
        for blk in self.blocks_u:
            x = blk(x)
        return x[:, :L_A], x[:, L_A:]

    def joint_embed(self, audio: Tensor, video: Tensor) -> Tensor:
        """Classifier input (method.md §6.3): [mean audio; mean video] of the unmasked joint pass after `norm`.

        -> (B, 2D)"""
        e_a, e_v = self.joint_codes(*self.unimodal_codes(audio, video))
        x = self.norm(torch.cat([e_a, e_v], dim=1))
        return torch.cat([x[:, : e_a.shape[1]].mean(1), x[:, e_a.shape[1]:].mean(1)], dim=1)

    def modality_embed(self, x_a: Tensor, x_v: Tensor) -> tuple[Tensor, Tensor]:
        """Fusion layers per modality with the _a / _v norms, then norm_a / norm_v (method.md §1.4, latent_c_*).

        x_a, x_v: tokens after the modality layers and the intermediate pos-embed.  -> same shapes.
        """
        for blk in self.blocks_u:
            x_a = blk(x_a, "a")
        for blk in self.blocks_u:
            x_v = blk(x_v, "v")
        return self.norm_a(x_a), self.norm_v(x_v)

    def retrieval_embed(self, audio: Tensor, video: Tensor) -> tuple[Tensor, Tensor]:
        """method.md §1.8: full inputs through the modality path, mean-pooled, L2-normalised.  -> (B, D), (B, D)"""
        c_a, c_v = self.unimodal_codes(audio, video)
        lat_a, lat_v = self.modality_embed(c_a + self.inter_pos_embed_a, c_v + self.inter_pos_embed_v)
        return F.normalize(lat_a.mean(1).float(), dim=-1), F.normalize(lat_v.mean(1).float(), dim=-1)

    # -- MAE + contrastive -----------------------------------------------------------------------------

    def forward_encoder(self, audio: Tensor, video: Tensor, ids_a: Tensor | None, ids_v: Tensor | None,
                        generator: torch.Generator | None) -> tuple[Masked, Masked]:
        """Embed, mask (audio first, as the authors), run the modality layers on the visible tokens only."""
        out = []
        for modality, x, ids, ratio, L, blocks, inter_pos in (
                ("a", audio, ids_a, self.mask_ratio_a, self.num_audio_tokens, self.blocks_a, self.inter_pos_embed_a),
                ("v", video, ids_v, self.mask_ratio_v, self.num_video_tokens, self.blocks_v, self.inter_pos_embed_v)):
            patches, ids_in = self.input_patches(x, ids, modality)  # (B, N, C, p, p), (B, N)
            tokens = self.embed(patches, ids_in, modality)  # (B, N, D)
            pos_vis, is_target = modality_guided_masking(ids_in, int(L * (1 - ratio)), generator)
            h = tokens.gather(1, pos_vis[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, n, D)
            for blk in blocks:
                h = blk(h)
            h = h + lookup(inter_pos, ids_in.gather(1, pos_vis))  # intermediate pos-embed at the visible ids
            out.append(Masked(h, patches, ids_in, pos_vis, is_target))
        return out[0], out[1]

    def forward_decoder(self, a: Masked, v: Masked) -> tuple[Tensor, Tensor]:
        """Joint fusion on the visible tokens, `norm`, then the decoder once per modality (method.md §1.6).

        Each decoder sequence holds the N input tokens (L with random masking, K with core patches): visible
        tokens in place, mask tokens elsewhere.  Returns predictions of the targets only, in input order:
        pred_a (B, N_a - n_a, p²), pred_v (B, N_v - n_v, 3p²).
        """
        x = torch.cat([a.x, v.x], dim=1)  # (B, n_a + n_v, D)
        for blk in self.blocks_u:
            x = blk(x)
        y = self.decoder_embed(self.norm(x))  # (B, n_a + n_v, Dd)
        n_a = a.x.shape[1]
        pred_a = self.decode(y[:, :n_a], a, self.mask_token_a, self.decoder_pos_embed_a, self.decoder_modality_a,
                             self.mae_score_audio)
        pred_v = self.decode(y[:, n_a:], v, self.mask_token_v, self.decoder_pos_embed_v, self.decoder_modality_v,
                             self.mae_score_video)
        return pred_a, pred_v

    def decode(self, y: Tensor, m: Masked, mask_token: Tensor, pos_embed: Tensor, modality: Tensor,
               head: MAEHead) -> Tensor:
        B, N = m.ids.shape
        Dd = y.shape[-1]
        z = mask_token.to(y.dtype).expand(B, N, Dd).scatter(1, m.pos_vis[..., None].expand(-1, -1, Dd), y)  # (B, N, Dd)
        z = z + lookup(pos_embed, m.ids) + modality
        for blk in self.decoder_blocks:
            z = blk(z)
        z = self.decoder_norm(z)
        return head(z[m.is_target].reshape(B, -1, Dd))  # (B, N - n, P)

    def forward_loss(self, pred: Tensor, m: Masked, reduction: str = "mean") -> Tensor:
        """method.md §1.7: MSE to per-patch-normalised pixels (unbiased var, eps 1e-6), on target tokens only, float32.

        Targets flatten a patch in (row, col, channel) order, as the authors' patchify.  Returns the mean over all
        targets of the batch, or (B,) per-sample means for reduction="none".
        """
        B, P = pred.shape[0], pred.shape[-1]
        target = m.patches[m.is_target].reshape(B, -1, *m.patches.shape[2:])  # (B, n_t, C, p, p)
        target = target.permute(0, 1, 3, 4, 2).reshape(B, -1, P)  # (B, n_t, P)
        with torch.autocast(pred.device.type, enabled=False):
            target = target.float()
            if self.norm_pix_loss:
                target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
            loss = ((pred.float() - target) ** 2).mean(-1).mean(-1)  # (B,): equal target counts per sample
        return self.mae_weight * (loss if reduction == "none" else loss.mean())

    def forward_contrastive(self, x_a: Tensor, x_v: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor, Tensor]:
        """method.md §1.7: InfoNCE on the mean-pooled modality path of the visible tokens. -> loss, z_a, z_v (B, D)"""
        lat_a, lat_v = self.modality_embed(x_a, x_v)
        z_a, z_v = lat_a.mean(1).float(), lat_v.mean(1).float()  # un-normalised: the DER targets (method.md §3.8)
        loss = info_nce(z_a, z_v, self.contrast_tau, reduction, remote_grad=self.contrast_remote_grad)
        return self.contrast_weight * loss, z_a, z_v

    def encode_pooled(self, audio: Tensor, video: Tensor,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Encoder-only pass of the CLS-ER / ESMER teachers (baselines.md §2.8): random masking, the modality
        layers and the per-modality fusion path, no decoder.  -> pooled z_a, z_v (B, D) as in forward."""
        a, v = self.forward_encoder(audio, video, None, None, generator)
        lat_a, lat_v = self.modality_embed(a.x, v.x)
        return lat_a.mean(1).float(), lat_v.mean(1).float()

    def forward(self, audio: Tensor, video: Tensor, ids_a: Tensor | None = None, ids_v: Tensor | None = None,
                reduction: str = "mean", generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """MAE + contrastive pass (method.md §1.4-1.7).

        audio (B, 1, T, M) and video (B, F, 3, S, S) with random masking; or core patches (B, K_A, 1, p, p),
        (B, K_V, 3, p, p) with orderings ids_a (B, L_A), ids_v (B, L_V) whose first K entries are the core set.
        Returns loss_mae_a, loss_mae_v, loss_con (scalars, or (B,) for reduction="none"), z_a, z_v (B, D).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        a, v = self.forward_encoder(audio, video, ids_a, ids_v, generator)
        pred_a, pred_v = self.forward_decoder(a, v)
        loss_con, z_a, z_v = self.forward_contrastive(a.x, v.x, reduction)
        return {"loss_mae_a": self.forward_loss(pred_a, a, reduction),
                "loss_mae_v": self.forward_loss(pred_v, v, reduction),
                "loss_con": loss_con, "z_a": z_a, "z_v": z_v}


# ----------------------------------------------------------------------------------------------------------
# AVM (method.md §2) and heads (models/heads.py)


class Pooler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.activation = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.dense(x))


class MatchingHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.pooler = Pooler(dim)
        self.fc = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pooler(x))


class Classifier(nn.Module):
    """Downstream probe head (method.md §6.3): Pooler (Linear + tanh), Linear, LayerNorm, GELU, Linear on (B, 2D).

    `pooler` and `fc1` are also registered inside `classifier`, so the state dict holds both names, as the authors'.
    """

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.pooler = Pooler(hidden_size)
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Sequential(self.pooler, self.fc1, nn.LayerNorm(hidden_size), nn.GELU(),
                                        nn.Linear(hidden_size, num_classes))
        self.apply(init_linear_and_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x)


class AVM(nn.Module):
    """Audio-video matching module (avm_module.py `CrossModalAttention`)."""

    def __init__(self, dim: int, num_heads: int, fix_head_reshape: bool = False):
        super().__init__()
        self.norm_v, self.norm_a = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fix_head_reshape = fix_head_reshape
        self.to_v_q, self.to_v_k, self.to_v_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_a_q, self.to_a_k, self.to_a_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.matching_score = MatchingHead(dim * 2)
        self.apply(init_linear_and_norm)

    def split_heads(self, x: Tensor, proj: nn.Linear) -> Tensor:
        B, L, _ = x.shape
        return proj(x).reshape(B, L, self.num_heads, -1).transpose(1, 2)  # (B, H, L, d_h)

    def merge_heads(self, x: Tensor) -> Tensor:
        B, H, L, d_h = x.shape
        if self.fix_head_reshape:
            return x.transpose(1, 2).reshape(B, L, H * d_h)  # (B, L, D)
        return x.reshape(B, L, H * d_h)  # faithful (method.md §9.3 B6): heads and tokens interleave; fix_head_reshape

    def attention_logits(self, e_a: Tensor, e_v: Tensor) -> dict[str, Tensor]:
        """method.md §2.3: raw scaled logits S_av (B, H, L_A, L_V) = scale·q_a·k_vᵀ,
        S_va (B, H, L_V, L_A) = scale·q_v·k_aᵀ, and q_a, k_a (B, H, L_A, d_h), q_v, k_v (B, H, L_V, d_h)."""
        e_a, e_v = self.norm_a(e_a), self.norm_v(e_v)
        q_a, k_a = self.split_heads(e_a, self.to_a_q), self.split_heads(e_a, self.to_a_k)
        q_v, k_v = self.split_heads(e_v, self.to_v_q), self.split_heads(e_v, self.to_v_k)
        return {"S_av": q_a @ k_v.transpose(-2, -1) * self.scale, "S_va": q_v @ k_a.transpose(-2, -1) * self.scale,
                "q_a": q_a, "k_a": k_a, "q_v": q_v, "k_v": k_v}

    def forward(self, e_a: Tensor, e_v: Tensor) -> Tensor:
        """method.md §2.2: cross attention both ways, mean over tokens, MatchingHead([video; audio]).  -> (B,) logits"""
        e_a, e_v = self.norm_a(e_a), self.norm_v(e_v)
        q_a, k_a, v_a = (self.split_heads(e_a, proj) for proj in (self.to_a_q, self.to_a_k, self.to_a_v))
        q_v, k_v, v_v = (self.split_heads(e_v, proj) for proj in (self.to_v_q, self.to_v_k, self.to_v_v))
        x_a = self.merge_heads(F.scaled_dot_product_attention(q_a, k_v, v_v))  # audio queries: (B, L_A, D)
        x_v = self.merge_heads(F.scaled_dot_product_attention(q_v, k_a, v_a))  # video queries: (B, L_V, D)
        return self.matching_score(torch.cat([x_v.mean(1), x_a.mean(1)], dim=-1)).squeeze(-1)  # video first


def matching_pairs(B: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """method.md §2.4: ⌊B/2⌋ positives at random rows (all positive when B <= 2); negatives get a deranged video.

    Returns labels (B,) float (1 = matched) and video_index (B,) long: the video paired with each audio.
    """
    if B <= 2:
        return torch.ones(B, device=device), torch.arange(B, device=device)
    n_pos = B // 2
    labels = torch.cat([torch.ones(n_pos), torch.zeros(B - n_pos)]).to(device)
    labels = labels[torch.randperm(B, generator=generator, device=device)]
    neg = (labels == 0).nonzero().flatten()  # (B - n_pos,)
    while True:  # reshuffle until no negative keeps its own video, as the authors
        deranged = neg[torch.randperm(len(neg), generator=generator, device=device)]
        if bool((deranged != neg).all()):
            break
    video_index = torch.arange(B, device=device)
    video_index[neg] = deranged
    return labels, video_index


def frozen_autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for STELLA's frozen passes when method.stella.frozen_bf16 is on; otherwise no context at all
    (an autocast(enabled=False) would switch off the training step's own AMP)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def matching_loss(backbone: CAVMAE, avm: AVM, c_a: Tensor, c_v: Tensor,
                  generator: torch.Generator | None = None, joint: tuple[Tensor, Tensor] | None = None,
                  frozen_bf16: bool = False) -> Tensor:
    """method.md §2.4: BCE-with-logits of the AVM on (audio, maybe swapped video) codes through the frozen joint pass.

    c_a (B, L_A, D), c_v (B, L_V, D) unimodal codes.  Only the AVM gets gradients.  Unweighted (the caller
    multiplies by matching_loss_weight).  joint: the caller's joint pass on the same, unswapped codes (e_a, e_v),
    if it has one; the positive rows then come from it and only the negatives run the fusion layers again (every
    fusion op works per clip, so the loss is bit-identical; with B <= 2 every row is positive: no second pass).
    frozen_bf16: the frozen joint pass under bf16 autocast, its codes returned in float32 (method.stella.frozen_bf16).
    """
    labels, video_index = matching_pairs(c_a.shape[0], generator, c_a.device)
    with torch.no_grad(), frozen_autocast(c_a.device, frozen_bf16):
        if joint is None:
            e_a, e_v = backbone.joint_codes(c_a, c_v[video_index])
        else:
            e_a, e_v = joint
            swapped = (video_index != torch.arange(len(video_index), device=c_a.device)).nonzero().flatten()
            if len(swapped):  # the negatives: audio b with another clip's video
                s_a, s_v = backbone.joint_codes(c_a[swapped], c_v[video_index[swapped]])
                e_a = e_a.index_copy(0, swapped, s_a.to(e_a.dtype))
                e_v = e_v.index_copy(0, swapped, s_v.to(e_v.dtype))
    if frozen_bf16:
        e_a, e_v = e_a.float(), e_v.float()
    logits = avm(e_a, e_v)
    with torch.autocast(logits.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(logits.float(), labels)
