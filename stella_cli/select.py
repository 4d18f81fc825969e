"""STELLA's probabilistic patch selection (method.md §3.6, §3.12).

Pure functions, randomness only from the `generator` argument (which must live on the tensors' device).
An *ordering* is a (B, L) long permutation of the token indices whose first K entries are the core set; it is
what the backbone takes as `ids_v` / `ids_a` (method.md §1.5). Masks follow MAE: True = pruned.
Token layouts (model.py): video t·(S/p)² + row·(S/p) + col; audio time-major t·F + f with F = M/p frequency
tokens, so an audio "chunk" of `chunk_times` time steps is a contiguous run of chunk_times·F token indices.

One STELLA iteration, after the buffer has something in it (current rows first, then replayed rows):
    z_v = prune_mask(cat([p_v, p_v_stored]), g)             # fresh Bernoulli draw for replayed clips too
    z_a = prune_mask(cat([p_a, p_a_stored]), g)
    order_v = select_video_patches(cat([I_v, I_v_stored]), z_v, K_V, g)
    order_a = select_audio_chunks(cat([I_a, I_a_stored]), z_a, K_A, F, chunk_times, g)
    core_v = gather_patches(video_patches(cat([video, video_stored]), p), order_v, K_V)
    core_a = gather_patches(audio_patches(cat([audio, audio_stored]), p), order_a, K_A)
and on the very first iteration (empty buffer): order = first_iteration_order(I, K), stored p = 0 (B9).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from stella_cli.errors import StellaError
from stella_cli.scoring import correlation_probs, correlation_probs_from_logits, importance_ranking


def prune_mask(p: Tensor, generator: torch.Generator) -> Tensor:
    """Bernoulli pruning z ~ Bernoulli(p) (method.md §3.6, `stella.py:120, 143, 146, 156`).

    p: (B, L) probabilities (0 outside the candidates).  Returns z: (B, L) bool, True = pruned.
    A NaN p (a diverged step, which train.py's guard then stops) is read as 0 instead of raising inside bernoulli.
    """
    return torch.bernoulli(p.float().nan_to_num(0.0), generator=generator).bool()  # (B, L) bool


def select_video_patches(I_v: Tensor, z_v: Tensor, K_V: int, generator: torch.Generator) -> Tensor:
    """Video ordering by sampling without replacement ∝ w = I_v·(1 − z_v) (method.md §3.6, `stella.py:150-151`).

    torch.multinomial without replacement (an exponential race) ranks zero-weight patches last, in arbitrary
    order (B10), so a pruned patch is never preferred over an unpruned one; the first K_V entries are the core.
    I_v: (B, L_V) importance (current, or stored for replayed clips); z_v: (B, L_V) bool.
    Returns order_v: (B, L_V) long.
    """
    if not 0 < K_V <= I_v.shape[1]:
        raise ValueError(f"select_video_patches: K_V={K_V} must be in 1..L_V={I_v.shape[1]}")
    w = I_v.float().masked_fill(z_v, 0.0)  # (B, L_V)
    # All-pruned rows (possible only when K_V = L_V) would make multinomial raise; fall back to I_v there.
    w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, I_v.float())  # (B, L_V)
    return torch.multinomial(w, w.shape[1], replacement=False, generator=generator)  # (B, L_V) long


def uniform_importance(B: int, L: int, device: torch.device | str = "cpu") -> Tensor:
    """I = 1/L for every token (ablations without importance, baselines.md §2.13): sampling ∝ I·(1 − z) is then
    uniform among the unpruned tokens and the audio chunks are drawn uniformly.  Returns (B, L) float32."""
    return torch.full((B, L), 1.0 / L, device=device)


def first_iteration_order(I: Tensor, K: int) -> Tensor:
    """Empty-buffer special case (method.md §3.6, B9): deterministic importance ranking, no pruning, no chunking.

    I: (B, L).  Returns π = argsort(I, descending) (B, L) long; its first K entries are the top-K core (and the
    candidate set of `scoring.candidates`). The caller stores p = 0 for these clips.
    """
    if not 0 < K <= I.shape[1]:
        raise ValueError(f"first_iteration_order: K={K} must be in 1..L={I.shape[1]}")
    return importance_ranking(I)  # (B, L) long


def gather_patches(patches: Tensor, order: Tensor, K: int) -> Tensor:
    """Core patches = the first K entries of the ordering (method.md §3.6, `stella.py:365-389`).

    patches: (B, L, C, p, p) from `model.video_patches` / `model.audio_patches`; order: (B, L) long.
    Returns (B, K, C, p, p).
    """
    B, L, C, p, _ = patches.shape
    if order.shape != (B, L):
        raise ValueError(f"gather_patches: order must be {(B, L)}, got {tuple(order.shape)}")
    return patches.gather(1, order[:, :K, None, None, None].expand(B, K, C, p, p))  # (B, K, C, p, p)


# ----------------------------------------------------------------------------------------------------------
# audio: time-contiguous chunk selection (`stella.py:312-361`)


def _chunk_sizes(L_A: int, num_freq_tokens: int, chunk_times: int) -> tuple[int, int]:
    if L_A % num_freq_tokens:
        raise ValueError(f"audio selection: L_A={L_A} is not a multiple of num_freq_tokens={num_freq_tokens}")
    T = L_A // num_freq_tokens
    if T % chunk_times:
        # the authors' avg_pool1d would silently leave the last T % chunk_times time steps out of every chunk
        raise StellaError(f"audio selection: num_core_audio_times={chunk_times} must divide the {T} audio time "
                          f"tokens (target_length / patch_size)")
    return T // chunk_times, chunk_times * num_freq_tokens


def draw_audio_chunks(I_a: Tensor, num_freq_tokens: int, chunk_times: int,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The random part of the audio selection: chunk order and trim side (method.md §3.6).

    u[t] = Σ_f I_a[t·F + f]; chunk score c[k] = mean(u[k·chunk_times : (k+1)·chunk_times]);
    chunk_order = multinomial(c, n_chunks, without replacement) (`stella.py:314-321`); and one fair coin per clip,
    trim_end, used only when the crossing chunk has both or neither neighbour taken (the authors'
    `random.randint(0, 1) == 0`, drawn here from the generator for every clip, method.md §9.3 B17).
    I_a: (B, L_A).  Returns chunk_order (B, n_chunks) long and trim_end (B,) bool.
    """
    B, L_A = I_a.shape
    n_chunks, _ = _chunk_sizes(L_A, num_freq_tokens, chunk_times)
    u = I_a.float().reshape(B, -1, num_freq_tokens).sum(dim=2)  # (B, T)
    c = u.reshape(B, n_chunks, chunk_times).mean(dim=2)  # (B, n_chunks)
    chunk_order = torch.multinomial(c, n_chunks, replacement=False, generator=generator)  # (B, n_chunks)
    trim_end = torch.randint(0, 2, (B,), generator=generator, device=I_a.device) == 0  # (B,) bool
    return chunk_order, trim_end


def audio_chunk_prune(z_a: Tensor, K_A: int, num_freq_tokens: int, chunk_times: int, chunk_order: Tensor,
                      trim_end: Tensor) -> Tensor:
    """Greedy chunk fill to exactly K_A unpruned tokens, vectorised over the batch (method.md §3.6).

    Walk the chunks in `chunk_order`, adding up n_k = unpruned tokens of chunk k. The crossing chunk is the first
    one where the running total exceeds K_A (strictly); chunks before it keep their Bernoulli mask, chunks after
    it are fully pruned, and the crossing chunk keeps K_A − (total before it) of its unpruned tokens:
      * trimmed from the end (its first unpruned tokens in time-major order are kept, so whole late time rows go
        first) when its left neighbour k−1 was taken before it and its right neighbour k+1 was not;
      * trimmed from the start (its last unpruned tokens kept) in the mirror case;
      * otherwise (both or neither neighbour taken) from the end if trim_end[b], else from the start.
    Chunks 0 and n_chunks−1 have no neighbour outside the clip. If the clip has at most K_A unpruned tokens in all,
    nothing changes (the caller's ordering then puts some pruned tokens in the core, as the authors' argsort does).
    z_a: (B, L_A) bool Bernoulli mask; chunk_order: (B, n_chunks) long; trim_end: (B,) bool.
    Returns the final mask (B, L_A) bool, True = pruned.
    """
    B, L_A = z_a.shape
    n_chunks, chunk_len = _chunk_sizes(L_A, num_freq_tokens, chunk_times)
    dev = z_a.device
    z = z_a.reshape(B, n_chunks, chunk_len)  # (B, n_chunks, chunk_len) bool
    n = (~z).sum(dim=2)  # (B, n_chunks) unpruned tokens per chunk
    total = n.gather(1, chunk_order).cumsum(dim=1)  # (B, n_chunks) running total in walk order
    r = (total <= K_A).sum(dim=1)  # (B,) walk position of the crossing chunk; n_chunks = none
    crossing = r < n_chunks  # (B,) bool
    r_c = r.clamp(max=n_chunks - 1)  # (B,)
    walk_pos = torch.empty_like(chunk_order).scatter_(
        1, chunk_order, torch.arange(n_chunks, device=dev).expand(B, n_chunks))  # (B, n_chunks) rank of chunk k
    k_star = chunk_order.gather(1, r_c[:, None])  # (B, 1) crossing chunk index
    taken = walk_pos < r_c[:, None]  # (B, n_chunks) walked before the crossing chunk
    taken_pad = torch.nn.functional.pad(taken, (1, 1), value=False)  # (B, n_chunks + 2)
    left = taken_pad.gather(1, k_star).squeeze(1)  # (B,) chunk k*−1 taken (index k* in the padded row)
    right = taken_pad.gather(1, k_star + 2).squeeze(1)  # (B,) chunk k*+1 taken
    from_end = torch.where(left ^ right, left, trim_end)  # (B,) bool
    before = total.gather(1, r_c[:, None]) - n.gather(1, k_star)  # (B, 1) unpruned tokens before k*
    keep = K_A - before  # (B, 1) unpruned tokens of k* that stay
    fwd = (~z).cumsum(dim=2)  # (B, n_chunks, chunk_len) 1-based rank of each unpruned token from the start
    bwd = n[:, :, None] - fwd + 1  # rank from the end (valid on unpruned tokens)
    rank = torch.where(from_end[:, None, None], fwd, bwd)  # (B, n_chunks, chunk_len)
    is_star = torch.arange(n_chunks, device=dev)[None, :] == k_star  # (B, n_chunks)
    trimmed = is_star[:, :, None] & (rank > keep[:, :, None])  # (B, n_chunks, chunk_len)
    after = walk_pos > r_c[:, None]  # (B, n_chunks) walked after k*: fully pruned
    z_new = z | trimmed | after[:, :, None]  # (B, n_chunks, chunk_len)
    z_new = torch.where(crossing[:, None, None], z_new, z)
    return z_new.reshape(B, L_A)  # (B, L_A) bool


def audio_chunk_prune_loop(z_a: Tensor, K_A: int, num_freq_tokens: int, chunk_times: int, chunk_order: Tensor,
                           trim_end: Tensor) -> Tensor:
    """Per-clip loop reference for `audio_chunk_prune`, step for step as `compute_core_audio_indices`.

    Same inputs and output; used by the tests (parity) and benchmarks/bench_select.py (speed).
    """
    B, L_A = z_a.shape
    n_chunks, chunk_len = _chunk_sizes(L_A, num_freq_tokens, chunk_times)
    z = z_a.clone().reshape(B, n_chunks, chunk_len)  # (B, n_chunks, chunk_len)
    for b in range(B):
        num_tokens = 0
        for t_idx in range(n_chunks):
            k = int(chunk_order[b, t_idx])
            num_tokens += chunk_len - int(z[b, k].sum())
            if num_tokens > K_A:
                walked = chunk_order[b, :t_idx].tolist()
                left, right = (k - 1) in walked, (k + 1) in walked
                from_end = left if left != right else bool(trim_end[b])
                chunk = z[b, k]  # (chunk_len,) view
                free = ~chunk
                surplus = num_tokens - K_A
                if from_end:
                    cut = int(torch.nonzero(torch.flip(free, (0,)).cumsum(0) == surplus)[0])
                    chunk[chunk_len - cut - 1:] = True
                else:
                    cut = int(torch.nonzero(free.cumsum(0) == surplus)[0])
                    chunk[:cut + 1] = True
                for later in chunk_order[b, t_idx + 1:].tolist():
                    z[b, later] = True
                break
    return z.reshape(B, L_A)


def order_unpruned_first(z: Tensor) -> Tensor:
    """Audio ordering = unpruned tokens first (method.md §3.6, `stella.py:162-164`).

    z: (B, L) bool.  Returns (B, L) long; each group in ascending token index (the authors' argsort leaves the
    order inside a group unspecified).
    """
    return torch.sort(z.to(torch.uint8), dim=1, stable=True).indices  # (B, L) long


def select_audio_chunks(I_a: Tensor, z_a: Tensor, K_A: int, num_freq_tokens: int, chunk_times: int,
                        generator: torch.Generator) -> Tensor:
    """Audio ordering by time-chunk selection (method.md §3.6, `compute_core_audio_indices`), vectorised.

    I_a: (B, L_A) importance (current, or stored for replayed clips; unpruned, as the authors use it for the
    chunk scores); z_a: (B, L_A) bool Bernoulli mask.  Returns order_a: (B, L_A) long whose first K_A entries are
    exactly K_A unpruned tokens whenever the clip has that many (see `audio_chunk_prune`).
    """
    chunk_order, trim_end = draw_audio_chunks(I_a, num_freq_tokens, chunk_times, generator)
    z = audio_chunk_prune(z_a, K_A, num_freq_tokens, chunk_times, chunk_order, trim_end)
    return order_unpruned_first(z)  # (B, L_A) long


def select_audio_chunks_loop(I_a: Tensor, z_a: Tensor, K_A: int, num_freq_tokens: int, chunk_times: int,
                             generator: torch.Generator) -> Tensor:
    """`select_audio_chunks` with the per-clip loop; same generator draws, so identical output."""
    chunk_order, trim_end = draw_audio_chunks(I_a, num_freq_tokens, chunk_times, generator)
    z = audio_chunk_prune_loop(z_a, K_A, num_freq_tokens, chunk_times, chunk_order, trim_end)
    return order_unpruned_first(z)  # (B, L_A) long


# ----------------------------------------------------------------------------------------------------------
# STELLA+ (`stella_p.py`): current clips only; replayed clips are used as stored


def select_video_patches_plus(I_v: Tensor, z_v: Tensor, K_V: int, generator: torch.Generator) -> Tensor:
    """STELLA+ video ordering (method.md §3.12, `stella_p.py:125-130`).

    K_V patches drawn without replacement ∝ I_v·(1 − z_v); ordering = [drawn, ascending index; rest, ascending].
    I_v: (B, L_V); z_v: (B, L_V) bool.  Returns order_v: (B, L_V) long.
    """
    order = select_video_patches(I_v, z_v, K_V, generator)  # (B, L_V): same race, first K_V are the draw
    chosen = torch.zeros_like(z_v).scatter(1, order[:, :K_V], True)  # (B, L_V) bool
    return order_unpruned_first(~chosen)  # (B, L_V) long


class PlusSelection(NamedTuple):
    order_v: Tensor  # (B, L_V) long, first K_V = core
    order_a: Tensor  # (B, L_A) long, first K_A = core
    p_v: Tensor  # (B, L_V) RCA probabilities (not stored by STELLA+)
    p_a: Tensor  # (B, L_A)


def select_plus_current(I_v: Tensor, I_a: Tensor, C_v: Tensor, C_a: Tensor, S_va: Tensor, k_v: Tensor,
                        k_a: Tensor, q_bar_v: Tensor, q_bar_a: Tensor, q_bar_v_past: Tensor, q_bar_a_past: Tensor,
                        *, K_A: int, num_freq_tokens: int, chunk_times: int, scale: float,
                        generator: torch.Generator, faithful_plus_rca_rows: bool = False,
                        uniform_choice: bool = False) -> PlusSelection:
    """STELLA+ selection of the current clips when the buffer is non-empty (method.md §3.12, `stella_p.py:101-155`).

    1. p_v = RCA on the video candidates; z_v ~ Bernoulli(p_v); order_v = `select_video_patches_plus`.
    2. p_a = RCA on the audio candidates; z_a ~ Bernoulli(p_a); order_a = `select_audio_chunks`.
    Bug B8 (method.md §9.3): `stella_p.py:128` overwrites the video ordering with the step-1 draw before the audio RCA
    (`:136-141`) gathers its rows, so s_cur for audio token i becomes Σ_k I_v[C_v[k]]·S_va[order_v[k], i] /
    Σ_k I_v[C_v[k]], k < K_V: the rows are the K_V *drawn* video patches in ascending index order, the weights
    the importances of the K_V *candidates* in descending-importance order, paired position by position.
    faithful_plus_rca_rows=True reproduces that (`correlation_probs_from_logits` with those rows); False (default)
    uses the candidates' own rows, i.e. s_cur = scale·⟨k_a, q̄_v⟩ as in STELLA.
    Shapes: I_v (B, L_V), I_a (B, L_A), C_v (B, K_V), C_a (B, K_A), S_va (B, H, L_V, L_A), k_v (B, H, L_V, d_h),
    k_a (B, H, L_A, d_h), q̄ (B, H, d_h), q̄_past (R, H, d_h) (paired b with b).
    uniform_choice=True (the `correlation` ablation) samples the patches and audio chunks uniformly among the
    unpruned ones instead of ∝ I; I still gives the candidates and the RCA weights.
    """
    K_V = C_v.shape[1]
    p_v = correlation_probs(k_v, q_bar_a, q_bar_a_past, C_v, scale)  # (B, L_V)
    z_v = prune_mask(p_v, generator)  # (B, L_V)
    W_v, W_a = (uniform_importance(*I_v.shape, I_v.device), uniform_importance(*I_a.shape, I_a.device)) \
        if uniform_choice else (I_v, I_a)  # selection weights
    order_v = select_video_patches_plus(W_v, z_v, K_V, generator)  # (B, L_V)
    if faithful_plus_rca_rows:
        # faithful: rows from the overwritten ordering, weights from the original candidates (B8)
        p_a = correlation_probs_from_logits(S_va, order_v[:, :K_V], I_v.gather(1, C_v), k_a, q_bar_v_past, C_a,
                                            scale)  # (B, L_A)
    else:
        p_a = correlation_probs(k_a, q_bar_v, q_bar_v_past, C_a, scale)  # (B, L_A)
    z_a = prune_mask(p_a, generator)  # (B, L_A)
    order_a = select_audio_chunks(W_a, z_a, K_A, num_freq_tokens, chunk_times, generator)  # (B, L_A)
    return PlusSelection(order_v, order_a, p_v, p_a)
