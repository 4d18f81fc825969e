"""Downstream heads on a frozen backbone: schedule, SpecAugment, top-k with averaged clip softmax, training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stella_cli.config import HeadConfig
from stella_cli.downstream import feature_batches, fit, topk_correct, warmup_cosine
from stella_cli.model import Classifier
from stella_cli.probe import averaged_clip_probs, spec_augment


def test_warmup_then_cosine_to_zero():
    # 2 warm-up steps, 6 in total: 1/2, 2/2, then cos over the 4 remaining steps
    factors = [warmup_cosine(s, 2, 6) for s in range(7)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0)
    assert factors[4] == pytest.approx(0.5)
    assert factors[6] == pytest.approx(0.0, abs=1e-12)
    assert factors[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_spec_augment_masks_one_band_and_one_time_span():
    fbank = np.zeros((40, 16), dtype=np.float32) + 5
    g = torch.Generator().manual_seed(3)
    out = spec_augment(fbank, freqm=8, timem=12, fill=-1.0, generator=g)
    masked = out == -1.0
    cols = np.flatnonzero(masked.all(axis=0))  # frequency bins masked at every time
    rows = np.flatnonzero(masked.all(axis=1))
    assert len(cols) < 8 and len(rows) < 12
    if len(cols):
        assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))  # one contiguous band
    expected = np.zeros_like(masked)
    expected[:, cols] = True
    expected[rows, :] = True
    assert np.array_equal(masked, expected)  # nothing else touched
    assert np.array_equal(spec_augment(fbank, 0, 0, -1.0, g), fbank)


def test_top_k_with_the_clip_softmax_averaged():
    # video 0: clip logits favour class 2 once strongly and class 1 twice mildly -> averaged softmax decides
    logits = torch.tensor([[[0.0, 0.0, 8.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
                           [[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    probs = averaged_clip_probs(logits)
    e = math.exp
    p0 = [(1 / (2 + e(8)) + 2 / (2 + e(1))) / 3, (1 / (2 + e(8)) + 2 * e(1) / (2 + e(1))) / 3,
          (e(8) / (2 + e(8)) + 2 / (2 + e(1))) / 3]
    assert probs[0].tolist() == pytest.approx(p0, rel=1e-5)
    assert probs.sum(1).tolist() == pytest.approx([1.0, 1.0])
    labels = torch.tensor([1, 2])
    assert topk_correct(probs, labels, 1).tolist() == [False, False]  # 0: class 2 wins (0.55 vs 0.41)
    assert topk_correct(probs, labels, 2).tolist() == [True, True]
    assert topk_correct(probs, labels, 5).tolist() == [True, True]  # k above the class count = all


def test_fit_learns_an_easy_problem_and_its_loss_falls():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 2
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g)
    torch.manual_seed(0)
    head = Classifier(16, 4)
    cfg = HeadConfig(epochs=8, lr=2e-2, warmup_epochs=1, batch_size=32)
    losses = fit(head, cfg, feature_batches(x[:160], y[:160], 32, seed=0), 5, F.cross_entropy)
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        accuracy = (head(x[160:]).argmax(1) == y[160:]).float().mean().item()
    assert accuracy > 0.9  # chance is 0.25


def test_patch_and_token_overlap_with_the_ground_truth():
    from stella_cli.localisation import audio_overlap, summarize_shares, video_overlap

    # 2x2 grid; frame 0: box covers the top-left cell fully and half of the top-right; frame 1: nothing
    boxes = torch.tensor([[[0.0, 0.0, 0.75, 0.5], [0.2, 0.2, 0.2, 0.2]]])
    o = video_overlap(boxes, 2)
    assert o.tolist() == [[1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]  # token t·4 + row·2 + col
    # 3 time tokens of 0.16 s, 2 frequency tokens each; event 0.08 .. 0.32 s
    oa = audio_overlap(torch.tensor([[0.08, 0.32]]), 3, 2, 0.16)
    assert oa[0].tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0, 0.0, 0.0])
    # importance all on the first video token -> share 1 vs uniform 1.5/8; uniform audio importance -> lift 1
    I_v = torch.zeros(1, 8)
    I_v[0, 0] = 1
    shares = {"share_v": (I_v * o).sum(1), "uniform_v": o.mean(1), "share_a": (oa / 6).sum(1),
              "uniform_a": oa.mean(1), "task": torch.tensor([0])}
    s = summarize_shares(shares, ["t0", "t1"])
    assert s["all"]["share_v"] == pytest.approx(100.0) and s["all"]["uniform_v"] == pytest.approx(100 * 1.5 / 8)
    assert s["all"]["lift_v"] == pytest.approx(8 / 1.5) and s["all"]["lift_a"] == pytest.approx(1.0)
    assert set(s) == {"all", "t0"} and s["t0"]["clips"] == 1


def test_the_avs_head_learns_masks_the_tokens_point_at():
    from stella_cli.avs import AVSHead, f_score

    g = torch.Generator().manual_seed(0)
    B, grid, H = 96, 4, 8
    cells = torch.randint(0, grid * grid, (B,), generator=g)  # one object cell per image
    tokens = torch.randn(B, grid * grid, H, generator=g) * 0.1
    tokens[torch.arange(B), cells, 0] += 2.0  # the object's token says so in feature 0
    masks = torch.zeros(B, 16, 16)
    for b, c in enumerate(cells.tolist()):
        r, k = divmod(c, grid)
        masks[b, 4 * r:4 * r + 4, 4 * k:4 * k + 4] = 1  # its 4 x 4 pixel block
    torch.manual_seed(0)
    head = AVSHead(H, 4, layers=1, grid=grid, out_size=16, channels=8)
    audio = torch.zeros(B, 4)
    cfg = HeadConfig(epochs=25, lr=1e-2, warmup_epochs=1, batch_size=16)

    def batches(epoch):
        for i in range(0, 64, 16):
            yield ([tokens[i:i + 16]], audio[i:i + 16]), masks[i:i + 16]

    losses = fit(head, cfg, batches, 4, F.binary_cross_entropy_with_logits)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        prob = torch.sigmoid(head(([tokens[64:]], audio[64:])))
    assert f_score(prob, masks[64:] > 0) > 0.7  # all-ones scores (1.3·0.0625) / (0.3·0.0625 + 1) = 0.08
