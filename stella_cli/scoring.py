"""STELLA's scoring steps: Localized Patch Importance Scoring and Replay-guided Correlation Assessment.

method.md §3.2 (importance I and candidates C), §3.4 (query prototypes q̄), §3.5 (RCA probabilities p).
Pure functions: tensors in, tensors out, computed in float32 whatever the input dtype (the AVM logits may come
out of an autocast region in bf16/fp16). Notation as in `model.py`: B clips, H heads, d_h head width, L_V / L_A
tokens, K_V / K_A candidates (= core tokens: both are int(L·(1 − core_ratio)) in the authors' code).

The AVM's `attention_logits` gives S_av (B, H, L_A, L_V) = scale·⟨q_a, k_v⟩ (audio queries × video keys) and
S_va (B, H, L_V, L_A) = scale·⟨q_v, k_a⟩, plus q_a, k_a (B, H, L_A, d_h) and q_v, k_v (B, H, L_V, d_h).
"""

from __future__ import annotations

import torch
from torch import Tensor


def patch_importance(S: Tensor, tau: float) -> Tensor:
    """Localized patch importance (method.md §3.2, `stella.py:296, 299`).

    I[b, j] = 1/(H·L_q) Σ_h Σ_i softmax_j(S[b, h, i, j] / τ);  Σ_j I[b, j] = 1.
    S: (B, H, L_q, L_k) attention logits, queries × keys. S_av gives I_v (B, L_V); S_va gives I_a (B, L_A).
    """
    if S.dim() != 4:
        raise ValueError(f"patch_importance: S must be (B, H, L_q, L_k), got shape {tuple(S.shape)}")
    if tau <= 0:
        raise ValueError(f"patch_importance: temperature tau must be > 0, got {tau}")
    A = (S / tau).softmax(dim=-1, dtype=torch.float32)  # (B, H, L_q, L_k)
    return A.mean(dim=(1, 2))  # (B, L_k)


def importance_ranking(I: Tensor) -> Tensor:
    """π = argsort(I, descending) (method.md §3.2), ties broken by token index (stable sort).  (B, L) long"""
    return torch.sort(I, dim=1, descending=True, stable=True).indices  # (B, L)


def candidates(I: Tensor, K: int) -> Tensor:
    """Candidate set C = the K most important tokens (method.md §3.2: C = π[:K]).

    I: (B, L).  Returns C: (B, K) long, most important first.
    """
    if not 0 < K <= I.shape[1]:
        raise ValueError(f"candidates: K={K} must be in 1..L={I.shape[1]}")
    return importance_ranking(I)[:, :K]  # (B, K)


def gather_tokens(x: Tensor, C: Tensor) -> Tensor:
    """Per-head rows of the tokens in C: x (B, H, L, d_h), C (B, K) long -> (B, H, K, d_h) float32."""
    B, H, _, d_h = x.shape
    return x.float().gather(2, C[:, None, :, None].expand(B, H, C.shape[1], d_h))


def query_prototypes(q: Tensor, I: Tensor, C: Tensor) -> Tensor:
    """Importance-weighted query prototype of one modality, per head (method.md §3.4, `stella.py:73-91`).

    q̄[b, h] = Σ_{j∈C_b} I[b, j]·q[b, h, j] / Σ_{j∈C_b} I[b, j].
    q: (B, H, L, d_h) queries, I: (B, L) importance, C: (B, K) candidates.  Returns q̄: (B, H, d_h) float32.
    """
    q_C = gather_tokens(q, C)  # (B, H, K, d_h)
    w = I.float().gather(1, C)  # (B, K)
    return torch.einsum("bhkd,bk->bhd", q_C, w) / w.sum(dim=1)[:, None, None]  # (B, H, d_h)


def pair_with_replay(q_bar_past: Tensor, B: int) -> Tensor:
    """Current clip b is compared with replayed clip b (method.md §3.5, `audio_query[:N]`, B11).

    q_bar_past: (R, H, d_h) prototypes of the replay batch.  Returns (B, H, d_h): rows 0..B-1 when R ≥ B (the
    authors' slice). When R < B (per-rank memory smaller than the batch) the authors' code fails on a shape
    mismatch; here clip b is paired with replayed clip b mod R.
    """
    R = q_bar_past.shape[0]
    if R == 0:
        raise ValueError("pair_with_replay: the replay batch is empty (RCA runs only when the buffer is not)")
    if R >= B:
        return q_bar_past[:B]
    return q_bar_past[torch.arange(B, device=q_bar_past.device) % R]  # (B, H, d_h)


def correlation_probs(k: Tensor, q_bar_cur_other: Tensor, q_bar_past_other: Tensor, C: Tensor,
                      scale: float) -> Tensor:
    """Replay-guided Correlation Assessment (method.md §3.5, `stella.py:93-143`).

    p[b, j] = 1/H Σ_h σ(s_past[b, h, j] − s_cur[b, h, j]) for j ∈ C_b, and 0 elsewhere, with
      s_past = scale·⟨k[b, h, j], q̄_past[b, h]⟩   (the other modality's prototype of replayed clip b),
      s_cur  = scale·⟨k[b, h, j], q̄_cur[b, h]⟩    (the other modality's prototype of the clip itself).
    The authors compute s_cur as the I-weighted average of the logit rows S[b, h, i, j] over the other modality's
    candidates i; by linearity of S in the queries this is the same number (`correlation_probs_from_logits`,
    checked in tests/test_scoring.py). σ(x − y) is their 2-way softmax [exp x, exp y][0]; no temperature.
    Video: k = k_v, q̄ = audio prototypes, C = C_v.  Audio: k = k_a, q̄ = video prototypes, C = C_a.
    k: (B, H, L, d_h); q_bar_cur_other: (B, H, d_h); q_bar_past_other: (R, H, d_h), paired by `pair_with_replay`;
    C: (B, K).  Returns p: (B, L) float32.
    """
    s_cur = scale * torch.einsum("bhkd,bhd->bhk", gather_tokens(k, C), q_bar_cur_other.float())  # (B, H, K)
    return _probs_against_replay(k, s_cur, q_bar_past_other, C, scale)  # (B, L)


def correlation_probs_from_logits(S_other: Tensor, rows: Tensor, row_weights: Tensor, k: Tensor,
                                  q_bar_past_other: Tensor, C: Tensor, scale: float) -> Tensor:
    """RCA with s_cur written as the authors do (`stella.py:104-109, 128-133`): a weighted mean of logit rows.

    s_cur[b, h, j] = Σ_r w[b, r]·S_other[b, h, rows[b, r], j] / Σ_r w[b, r]  for j ∈ C_b; the rest as
    `correlation_probs`. S_other: (B, H, L_other, L) logits with the other modality as queries (S_av for video
    probabilities, S_va for audio); rows: (B, R) query rows; row_weights: (B, R); k: (B, H, L, d_h); C: (B, K).
    STELLA uses rows = the other modality's candidates and row_weights = their importance, which equals
    `correlation_probs`; STELLA+ as released passes rows that no longer match the weights (method.md §9.3 B8, see
    `select.select_plus_current`). Returns p: (B, L) float32.
    """
    B, H, L, _ = k.shape
    K, R = C.shape[1], rows.shape[1]
    S_rows = S_other.gather(2, rows[:, None, :, None].expand(B, H, R, L))  # (B, H, R, L)
    S_rows = S_rows.gather(3, C[:, None, None, :].expand(B, H, R, K)).float()  # (B, H, R, K)
    w = row_weights.float()  # (B, R)
    s_cur = torch.einsum("bhrk,br->bhk", S_rows, w) / w.sum(dim=1)[:, None, None]  # (B, H, K)
    return _probs_against_replay(k, s_cur, q_bar_past_other, C, scale)  # (B, L)


def _probs_against_replay(k: Tensor, s_cur: Tensor, q_bar_past_other: Tensor, C: Tensor, scale: float) -> Tensor:
    """p = mean_h σ(s_past − s_cur) on the candidates, 0 elsewhere; s_past from the paired replayed prototype.

    k: (B, H, L, d_h); s_cur: (B, H, K); q_bar_past_other: (R, H, d_h); C: (B, K).  Returns (B, L) float32.
    """
    B, L = k.shape[0], k.shape[2]
    q_past = pair_with_replay(q_bar_past_other, B).float()  # (B, H, d_h)
    s_past = scale * torch.einsum("bhkd,bhd->bhk", gather_tokens(k, C), q_past)  # (B, H, K)
    p_C = torch.sigmoid(s_past - s_cur).mean(dim=1)  # (B, K)
    return torch.zeros(B, L, device=k.device).scatter(1, C, p_C)  # (B, L)
