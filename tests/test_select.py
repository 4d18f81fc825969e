"""Probabilistic patch selection (method.md §3.6, §3.12, §9.3 B8-B10)."""

import pytest
import torch

from stella_cli.config import num_core_tokens
from stella_cli.errors import StellaError
from stella_cli.model import audio_patches, video_patches
from stella_cli.scoring import (candidates, correlation_probs, correlation_probs_from_logits, patch_importance,
                                query_prototypes)
from stella_cli.select import (audio_chunk_prune, audio_chunk_prune_loop, draw_audio_chunks, first_iteration_order,
                               gather_patches, order_unpruned_first, prune_mask, select_audio_chunks,
                               select_audio_chunks_loop, select_plus_current, select_video_patches,
                               select_video_patches_plus)

PRUNE = {"vectorised": audio_chunk_prune, "loop": audio_chunk_prune_loop}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_importance(B: int, L: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(B, L, generator=g).mul(2).softmax(dim=1)


def random_probs(I: torch.Tensor, K: int, g: torch.Generator) -> torch.Tensor:
    """p as RCA makes it: in (0, 1) on the K candidates, 0 elsewhere."""
    C = candidates(I, K)
    return torch.zeros_like(I).scatter(1, C, torch.rand(C.shape, generator=g))


# ----------------------------------------------------------------------------------------------------------
# pruning and video


def test_prune_mask_is_bernoulli_p():
    p = torch.tensor([[0.0, 1.0, 0.25]]).expand(40000, 3)
    z = prune_mask(p, gen(0))
    assert z.dtype == torch.bool
    assert not z[:, 0].any() and z[:, 1].all()
    assert z[:, 2].float().mean().item() == pytest.approx(0.25, abs=0.01)  # sd 0.0022


def test_video_ordering_is_a_permutation_that_never_prefers_a_pruned_patch():
    g = gen(1)
    B, L, K = 64, 20, 8
    I = random_importance(B, L, g)
    z = prune_mask(random_probs(I, 12, g), g)
    order = select_video_patches(I, z, K, g)
    assert order.dtype == torch.long and order.shape == (B, L)
    assert (order.sort(dim=1).values == torch.arange(L)).all()  # every token once: K distinct core patches
    n_free = (~z).sum(1)
    for b in range(B):
        m = int(n_free[b])
        assert set(order[b, :m].tolist()) == set((~z[b]).nonzero().flatten().tolist())
    assert (n_free >= K).all()  # only 12 candidates can be pruned, so the core is all unpruned here
    assert not z.gather(1, order[:, :K]).any()


def test_video_first_draw_is_proportional_to_pruned_importance():
    n = 20000
    I = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).expand(n, 4)
    z = torch.tensor([[False, True, False, False]]).expand(n, 4)
    first = select_video_patches(I, z, 2, gen(2))[:, 0]
    counts = torch.bincount(first, minlength=4).float()
    assert counts[1] == 0  # the pruned patch has weight 0
    expect = torch.tensor([0.125, 0.0, 0.375, 0.5]) * n  # w = [0.1, 0, 0.3, 0.4] / 0.8
    chi2 = ((counts[[0, 2, 3]] - expect[[0, 2, 3]]) ** 2 / expect[[0, 2, 3]]).sum().item()
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001


def test_video_selection_at_the_paper_sizes_keeps_392():
    g = gen(3)
    L_V = 4 * (224 // 16) ** 2
    K_V = num_core_tokens(L_V, 0.5)
    assert (L_V, K_V) == (784, 392)
    I_v = random_importance(6, L_V, g)
    z_v = prune_mask(random_probs(I_v, K_V, g), g)
    order = select_video_patches(I_v, z_v, K_V, g)
    core = order[:, :K_V]
    assert all(len(set(row.tolist())) == 392 for row in core)
    assert not z_v.gather(1, core).any()
    video = torch.randn(6, 4, 3, 224, 224, generator=g)
    assert gather_patches(video_patches(video, 16), order, K_V).shape == (6, 392, 3, 16, 16)


def test_first_iteration_is_deterministic_top_k():
    I = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.1, 0.3]])
    order = first_iteration_order(I, 2)
    assert order.tolist() == [[1, 3, 2, 0], [0, 3, 1, 2]]
    assert (order[:, :2] == candidates(I, 2)).all()
    with pytest.raises(ValueError, match="K=0"):
        first_iteration_order(I, 0)


def test_gather_patches_takes_the_right_pixels():
    video = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(1, 2, 3, 4, 4)  # (B, F, 3, S, S), p = 2
    order = torch.tensor([[7, 0, 1, 2, 3, 4, 5, 6]])  # token 7 = frame 1, row 1, col 1
    core = gather_patches(video_patches(video, 2), order, 2)
    assert core.shape == (1, 2, 3, 2, 2)
    assert torch.equal(core[0, 0], video[0, 1, :, 2:4, 2:4])
    assert torch.equal(core[0, 1], video[0, 0, :, 0:2, 0:2])
    audio = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)  # (B, 1, T, M), p = 2: token t·2 + f
    core_a = gather_patches(audio_patches(audio, 2), torch.tensor([[2, 0, 1, 3]]), 1)
    assert torch.equal(core_a[0, 0, 0], audio[0, 0, 2:4, 0:2])  # token 2 = time 1, freq 0
    with pytest.raises(ValueError, match="order must be"):
        gather_patches(video_patches(video, 2), order[:, :4], 2)


# ----------------------------------------------------------------------------------------------------------
# audio: hand-built cases on 4 chunks of 2 time steps x 2 frequency bins (chunk k = tokens 4k..4k+3)

F, CT = 2, 2  # num_freq_tokens, chunk_times


def kept(z: torch.Tensor) -> list[int]:
    return (~z[0]).nonzero().flatten().tolist()


def run(impl, z, K_A, order, trim_end):
    return PRUNE[impl](z, K_A, F, CT, torch.tensor([order]), torch.tensor([trim_end]))


@pytest.mark.parametrize("impl", PRUNE)
def test_audio_left_neighbour_taken_trims_the_end(impl):
    z = torch.zeros(1, 16, dtype=torch.bool)
    for coin in (True, False):  # the coin is not used when exactly one neighbour is taken
        # chunk 1 (4 tokens), then chunk 2 crosses K_A = 6: keep its first 2 tokens = time step 4, next to chunk 1
        assert kept(run(impl, z, 6, [1, 2, 0, 3], coin)) == [4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("impl", PRUNE)
def test_audio_right_neighbour_taken_trims_the_start(impl):
    z = torch.zeros(1, 16, dtype=torch.bool)
    for coin in (True, False):
        assert kept(run(impl, z, 6, [2, 1, 0, 3], coin)) == [6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("impl", PRUNE)
def test_audio_neither_or_both_neighbours_use_the_coin(impl):
    z = torch.zeros(1, 16, dtype=torch.bool)
    # neither: chunk 0, then chunk 2 crosses K_A = 6 with chunks 1 and 3 untaken
    assert kept(run(impl, z, 6, [0, 2, 1, 3], True)) == [0, 1, 2, 3, 8, 9]  # trim the end: late row goes
    assert kept(run(impl, z, 6, [0, 2, 1, 3], False)) == [0, 1, 2, 3, 10, 11]  # trim the start
    # both: chunks 1 and 3, then chunk 2 crosses K_A = 10
    assert kept(run(impl, z, 10, [1, 3, 2, 0], True)) == [4, 5, 6, 7, 8, 9, 12, 13, 14, 15]
    assert kept(run(impl, z, 10, [1, 3, 2, 0], False)) == [4, 5, 6, 7, 10, 11, 12, 13, 14, 15]
    # edge chunk: chunk 0 has no left neighbour, so with chunk 1 taken it trims the start
    assert kept(run(impl, z, 6, [1, 0, 2, 3], True)) == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("impl", PRUNE)
def test_audio_trim_counts_only_unpruned_tokens(impl):
    z = torch.zeros(1, 16, dtype=torch.bool)
    z[0, [8, 9]] = True  # chunk 2 has 2 unpruned tokens (10, 11)
    # chunk 1 (4) + chunk 2 (2) = 6 > 5: keep 1 of chunk 2 from the start side (left neighbour taken)
    assert kept(run(impl, z, 5, [1, 2, 0, 3], True)) == [4, 5, 6, 7, 10]
    z = torch.zeros(1, 16, dtype=torch.bool)
    z[0, [6, 7]] = True  # chunk 1 has 2 unpruned tokens (4, 5)
    assert kept(run(impl, z, 5, [2, 1, 0, 3], True)) == [5, 8, 9, 10, 11]  # right taken: keep the last one
    # reaching exactly K_A does not cross: the walk goes on, the next chunk crosses with 0 tokens to keep
    z = torch.zeros(1, 16, dtype=torch.bool)
    z[0, [9, 10]] = True
    assert kept(run(impl, z, 6, [1, 2, 0, 3], True)) == [4, 5, 6, 7, 8, 11]


@pytest.mark.parametrize("impl", PRUNE)
def test_audio_too_few_unpruned_tokens_leaves_the_mask(impl):
    z = torch.ones(1, 16, dtype=torch.bool)
    z[0, [3, 9, 14]] = False
    out = run(impl, z, 6, [0, 1, 2, 3], True)
    assert torch.equal(out, z)
    order = order_unpruned_first(out)
    assert order[0].tolist()[:3] == [3, 9, 14]  # the core takes the 3 unpruned, then pruned ones (index order)
    assert order[0].tolist()[3:6] == [0, 1, 2]


def test_audio_selection_at_the_paper_sizes_keeps_256_in_chunks():
    g = gen(4)
    L_A, K_A, Fq, ct = 512, num_core_tokens(512, 0.5), 8, 4
    assert K_A == 256
    I_a = random_importance(16, L_A, g)
    # with Bernoulli pruning: exactly K_A unpruned tokens first
    z_a = prune_mask(random_probs(I_a, K_A, g), g)
    order = select_audio_chunks(I_a, z_a, K_A, Fq, ct, g)
    assert (order.sort(dim=1).values == torch.arange(L_A)).all()
    assert not z_a.gather(1, order[:, :K_A]).any()
    chunk_order, trim_end = draw_audio_chunks(I_a, Fq, ct, gen(5))
    final = audio_chunk_prune(z_a, K_A, Fq, ct, chunk_order, trim_end)
    assert ((~final).sum(1) == K_A).all()
    assert (final | ~z_a).all()  # a pruned token is never revived
    # without pruning: whole 32-token chunks, one partial chunk trimmed on the correct side
    z0 = torch.zeros(16, L_A, dtype=torch.bool)
    final = audio_chunk_prune(z0, K_A, Fq, ct, chunk_order, trim_end)
    keep = (~final).reshape(16, 16, 32)  # (B, chunk, token in chunk)
    n = keep.sum(2)
    assert ((n == 0) | (n == 32)).sum(1).ge(15).all() and (n.sum(1) == 256).all()
    for b in range(16):
        partial = [k for k in range(16) if 0 < n[b, k] < 32]
        if not partial:
            continue
        (k,) = partial
        run_ = keep[b, k].int().tolist()
        m = sum(run_)
        prefix, suffix = run_ == [1] * m + [0] * (32 - m), run_ == [0] * (32 - m) + [1] * m
        assert prefix or suffix  # contiguous, whole late (or early) time rows removed first
        left = k > 0 and n[b, k - 1] == 32
        right = k < 15 and n[b, k + 1] == 32
        if left and not right:
            assert prefix
        elif right and not left:
            assert suffix
        else:
            assert prefix == bool(trim_end[b])


def test_audio_vectorised_equals_the_loop_on_random_batches():
    cases = 0
    for seed in range(60):
        g = gen(100 + seed)
        Fq = [2, 4, 8][seed % 3]
        ct = [1, 2, 4][(seed // 3) % 3]
        T = ct * int(torch.randint(2, 9, (1,), generator=g))
        B = int(torch.randint(1, 13, (1,), generator=g))
        L_A = T * Fq
        K_A = int(torch.randint(1, L_A + 1, (1,), generator=g))
        I_a = random_importance(B, L_A, g)
        z_a = torch.rand(B, L_A, generator=g) < torch.rand(B, 1, generator=g)  # 0..100 % pruned
        a = select_audio_chunks(I_a, z_a, K_A, Fq, ct, gen(seed))
        b = select_audio_chunks_loop(I_a, z_a, K_A, Fq, ct, gen(seed))
        assert torch.equal(a, b), f"seed {seed}"
        # and the masks, on explicit random chunk orders and coins
        order = torch.stack([torch.randperm(T // ct, generator=g) for _ in range(B)])
        coin = torch.rand(B, generator=g) < 0.5
        m1 = audio_chunk_prune(z_a, K_A, Fq, ct, order, coin)
        assert torch.equal(m1, audio_chunk_prune_loop(z_a, K_A, Fq, ct, order, coin)), f"seed {seed}"
        free = (~z_a).sum(1)
        assert torch.equal((~m1).sum(1), torch.where(free > K_A, torch.full_like(free, K_A), free))
        cases += B
    assert cases > 300


def test_audio_chunk_order_follows_chunk_importance():
    # chunk 2 carries almost all the importance: it is walked first almost always
    I_a = torch.full((4000, 16), 0.001)
    I_a[:, 8:12] = 1.0
    chunk_order, trim_end = draw_audio_chunks(I_a, F, CT, gen(6))
    assert (chunk_order[:, 0] == 2).float().mean() > 0.99
    assert 0.45 < trim_end.float().mean().item() < 0.55


def test_audio_sizes_are_checked():
    I_a = torch.ones(1, 20) / 20
    with pytest.raises(StellaError, match="num_core_audio_times=4 must divide the 10"):
        select_audio_chunks(I_a, torch.zeros(1, 20, dtype=torch.bool), 5, 2, 4, gen(0))
    with pytest.raises(ValueError, match="not a multiple of num_freq_tokens=3"):
        select_audio_chunks(I_a, torch.zeros(1, 20, dtype=torch.bool), 5, 3, 1, gen(0))


# ----------------------------------------------------------------------------------------------------------
# STELLA+ (method.md §3.12) and bug B8


def test_plus_video_ordering_is_the_draw_in_index_order():
    g = gen(7)
    I = random_importance(32, 12, g)
    z = prune_mask(random_probs(I, 6, g), g)
    order = select_video_patches_plus(I, z, 5, g)
    assert (order.sort(dim=1).values == torch.arange(12)).all()
    assert (order[:, :5].diff(dim=1) > 0).all() and (order[:, 5:].diff(dim=1) > 0).all()
    assert not z.gather(1, order[:, :5]).any()  # at least 6 unpruned, so the 5 drawn are unpruned
    # same generator state: the drawn set is the first K_V of STELLA's ordering
    drawn = select_video_patches(I, z, 5, gen(8))[:, :5].sort(dim=1).values
    assert torch.equal(select_video_patches_plus(I, z, 5, gen(8))[:, :5], drawn)


def test_plus_b8_faithful_and_fixed_differ_exactly_as_documented():
    g = gen(9)
    B, H, L_A, L_V, d_h, K_V, K_A = 3, 2, 16, 12, 4, 6, 8
    q_a, k_a = torch.randn(B, H, L_A, d_h, generator=g), torch.randn(B, H, L_A, d_h, generator=g)
    q_v, k_v = torch.randn(B, H, L_V, d_h, generator=g), torch.randn(B, H, L_V, d_h, generator=g)
    scale = d_h ** -0.5
    S_av, S_va = scale * q_a @ k_v.transpose(-2, -1), scale * q_v @ k_a.transpose(-2, -1)
    I_v, I_a = patch_importance(S_av, 0.4), patch_importance(S_va, 0.4)
    C_v, C_a = candidates(I_v, K_V), candidates(I_a, K_A)
    q_bar_v, q_bar_a = query_prototypes(q_v, I_v, C_v), query_prototypes(q_a, I_a, C_a)
    past_v, past_a = torch.randn(B, H, d_h, generator=g), torch.randn(B, H, d_h, generator=g)
    args = (I_v, I_a, C_v, C_a, S_va, k_v, k_a, q_bar_v, q_bar_a, past_v, past_a)
    kw = dict(K_A=K_A, num_freq_tokens=2, chunk_times=2, scale=scale)
    fixed = select_plus_current(*args, **kw, generator=gen(10), faithful_plus_rca_rows=False)
    buggy = select_plus_current(*args, **kw, generator=gen(10), faithful_plus_rca_rows=True)
    # video: identical (the bug comes after the video selection)
    assert torch.equal(fixed.order_v, buggy.order_v) and torch.equal(fixed.p_v, buggy.p_v)
    torch.testing.assert_close(fixed.p_v, correlation_probs(k_v, q_bar_a, past_a, C_v, scale))
    # fixed audio RCA = STELLA's: rows = video candidates, weights = their importance
    torch.testing.assert_close(fixed.p_a, correlation_probs(k_a, q_bar_v, past_v, C_a, scale))
    # faithful: rows = the K_V drawn video patches in index order, weights = I_v of the candidates, by position
    rows = buggy.order_v[:, :K_V]
    assert not torch.equal(rows, C_v)
    for b in range(B):
        for i in C_a[b].tolist():
            terms = []
            for h in range(H):
                w = I_v[b, C_v[b]]
                s_cur = float((w * S_va[b, h, rows[b], i]).sum() / w.sum())
                s_past = scale * float(k_a[b, h, i] @ past_v[b, h])
                terms.append(torch.sigmoid(torch.tensor(s_past - s_cur)).item())
            assert buggy.p_a[b, i].item() == pytest.approx(sum(terms) / H, abs=1e-6)
    assert (buggy.p_a - fixed.p_a).abs().max() > 1e-3
    assert ((buggy.p_a > 0) == (fixed.p_a > 0)).all()  # same support: the audio candidates
    # when the rows are the candidates themselves, the authors' formula gives the fixed numbers
    torch.testing.assert_close(correlation_probs_from_logits(S_va, C_v, I_v.gather(1, C_v), k_a, past_v, C_a, scale),
                               fixed.p_a)
    for sel in (fixed, buggy):
        assert sel.order_a.shape == (B, L_A) and sel.order_v.shape == (B, L_V)
