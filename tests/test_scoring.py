"""Localized Patch Importance Scoring, query prototypes and RCA (method.md §3.2, §3.4, §3.5)."""

import math

import pytest
import torch

from stella_cli.scoring import (candidates, correlation_probs, correlation_probs_from_logits, pair_with_replay,
                                patch_importance, query_prototypes)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_patch_importance_hand_computed():
    # S = tau·log(w) makes softmax(S / tau) = w / Σw, so each row below is an easy distribution.
    tau = 0.5
    w = torch.tensor([[[[1.0, 1.0, 2.0],    # head 0, query 0 -> [1/4, 1/4, 1/2]
                        [1.0, 1.0, 1.0]],   # head 0, query 1 -> [1/3, 1/3, 1/3]
                       [[2.0, 1.0, 1.0],    # head 1, query 0 -> [1/2, 1/4, 1/4]
                        [1.0, 6.0, 1.0]]]])  # head 1, query 1 -> [1/8, 3/4, 1/8]
    I = patch_importance(tau * w.log(), tau)
    # mean of the four rows: (1/4 + 1/3 + 1/2 + 1/8) / 4 = 29/96, (1/4 + 1/3 + 1/4 + 3/4) / 4 = 38/96
    assert I.shape == (1, 3)
    torch.testing.assert_close(I, torch.tensor([[29 / 96, 38 / 96, 29 / 96]]))


def test_patch_importance_sums_to_one_on_the_key_axis():
    g = torch.Generator().manual_seed(0)
    S_av = torch.randn(3, 4, 6, 10, generator=g) * 5  # (B, H, L_A, L_V)
    S_va = S_av.transpose(2, 3)  # (B, H, L_V, L_A)
    I_v, I_a = patch_importance(S_av, 0.4), patch_importance(S_va, 0.4)
    assert I_v.shape == (3, 10) and I_a.shape == (3, 6)
    torch.testing.assert_close(I_v.sum(1), torch.ones(3))
    torch.testing.assert_close(I_a.sum(1), torch.ones(3))
    # explicit sums, element by element
    b, j = 1, 7
    expect = sum(math.exp(S_av[b, h, i, j] / 0.4) / sum(math.exp(S_av[b, h, i, jj] / 0.4) for jj in range(10))
                 for h in range(4) for i in range(6)) / 24
    assert I_v[b, j].item() == pytest.approx(expect, rel=1e-5)
    # lower temperature sharpens: the largest importance grows
    assert patch_importance(S_av, 0.1).max() > I_v.max()
    # bf16 logits are scored in float32
    assert patch_importance(S_av.bfloat16(), 0.4).dtype == torch.float32


def test_candidates_are_the_top_k_most_important_first():
    I = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.2, 0.4, 0.4, 0.0]])
    assert candidates(I, 2).tolist() == [[1, 3], [1, 2]]  # ties keep token order
    assert candidates(I, 4).tolist() == [[1, 3, 2, 0], [1, 2, 0, 3]]
    with pytest.raises(ValueError, match="K=5"):
        candidates(I, 5)


def test_query_prototypes_hand_computed():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]],      # head 0
                       [[1.0, 1.0], [3.0, -1.0], [0.0, 0.0], [-2.0, 2.0]]]])  # head 1
    I = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    C = torch.tensor([[1, 3]])  # weights 0.4 and 0.3
    q_bar = query_prototypes(q, I, C)
    # head 0: (0.4·[0, 1] + 0.3·[4, 0]) / 0.7 = [12/7, 4/7];  head 1: (0.4·[3, -1] + 0.3·[-2, 2]) / 0.7 = [6/7, 2/7]
    torch.testing.assert_close(q_bar, torch.tensor([[[12 / 7, 4 / 7], [6 / 7, 2 / 7]]]))
    # the candidates' order does not matter
    torch.testing.assert_close(query_prototypes(q, I, C.flip(1)), q_bar)


def test_correlation_probs_hand_computed():
    scale = 0.5
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],     # head 0, keys j = 0, 1, 2
                       [[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]]]])  # head 1
    q_cur = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B, H, d_h): other modality, same clip
    q_past = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])  # replayed clip 0
    C = torch.tensor([[2, 0]])
    p = correlation_probs(k, q_cur, q_past, C, scale)
    # j = 0: head 0 s_past = 0, s_cur = 0.5 -> σ(-0.5); head 1 s_past = 1, s_cur = 0 -> σ(1)
    # j = 2: head 0 s_past = 1, s_cur = 0.5 -> σ(0.5); head 1 s_past = 0, s_cur = -0.5 -> σ(0.5)
    # j = 1 is not a candidate -> 0
    p0 = (sigmoid(-0.5) + sigmoid(1.0)) / 2  # 0.5542996
    assert p.shape == (1, 3) and p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([[p0, 0.0, sigmoid(0.5)]]))
    assert p[0, 0].item() == pytest.approx(0.5542996, abs=1e-6)


def test_replay_pairing_is_index_by_index():
    q_past = torch.arange(4.0).reshape(4, 1, 1)
    assert pair_with_replay(q_past, 2).flatten().tolist() == [0, 1]  # the authors' [:N]
    assert pair_with_replay(q_past[:2], 5).flatten().tolist() == [0, 1, 0, 1, 0]  # R < B: b mod R
    with pytest.raises(ValueError, match="empty"):
        pair_with_replay(q_past[:0], 2)


def _avm_like(B=2, H=3, L_A=6, L_V=10, d_h=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_a, k_a = torch.randn(B, H, L_A, d_h, generator=g), torch.randn(B, H, L_A, d_h, generator=g)
    q_v, k_v = torch.randn(B, H, L_V, d_h, generator=g), torch.randn(B, H, L_V, d_h, generator=g)
    scale = d_h ** -0.5
    S_av = scale * q_a @ k_v.transpose(-2, -1)  # (B, H, L_A, L_V), as AVM.attention_logits
    S_va = scale * q_v @ k_a.transpose(-2, -1)  # (B, H, L_V, L_A)
    return dict(q_a=q_a, k_a=k_a, q_v=q_v, k_v=k_v, S_av=S_av, S_va=S_va, scale=scale, g=g)


def test_s_cur_by_prototype_equals_the_authors_weighted_logit_rows():
    """method.md §3.5: the I-weighted average of S rows over the other modality's candidates = scale·⟨k, q̄⟩."""
    t = _avm_like()
    B, H, L_A, L_V, d_h = 2, 3, 6, 10, 4
    K_V, K_A = 5, 3
    I_v, I_a = patch_importance(t["S_av"], 0.4), patch_importance(t["S_va"], 0.4)
    C_v, C_a = candidates(I_v, K_V), candidates(I_a, K_A)
    q_bar_v, q_bar_a = query_prototypes(t["q_v"], I_v, C_v), query_prototypes(t["q_a"], I_a, C_a)
    past_v, past_a = torch.randn(3, H, d_h, generator=t["g"]), torch.randn(3, H, d_h, generator=t["g"])
    p_v = correlation_probs(t["k_v"], q_bar_a, past_a, C_v, t["scale"])
    p_a = correlation_probs(t["k_a"], q_bar_v, past_v, C_a, t["scale"])
    torch.testing.assert_close(
        p_v, correlation_probs_from_logits(t["S_av"], C_a, I_a.gather(1, C_a), t["k_v"], past_a, C_v, t["scale"]))
    torch.testing.assert_close(
        p_a, correlation_probs_from_logits(t["S_va"], C_v, I_v.gather(1, C_v), t["k_a"], past_v, C_a, t["scale"]))
    # and both against explicit loops over the authors' formula (stella.py:102-118)
    for b in range(B):
        for j in range(L_V):
            if j not in C_v[b].tolist():
                assert p_v[b, j].item() == 0.0
                continue
            terms = []
            for h in range(H):
                s_past = t["scale"] * float(t["k_v"][b, h, j] @ past_a[b, h])
                w = [float(I_a[b, i]) for i in C_a[b].tolist()]
                s_cur = sum(wi * float(t["S_av"][b, h, i, j]) for wi, i in zip(w, C_a[b].tolist())) / sum(w)
                terms.append(math.exp(s_past) / (math.exp(s_past) + math.exp(s_cur)))
            assert p_v[b, j].item() == pytest.approx(sum(terms) / H, abs=1e-6)
    assert ((p_v > 0) == torch.zeros_like(p_v, dtype=torch.bool).scatter(1, C_v, True)).all()
