"""Downstream heads on a frozen backbone: schedule, SpecAugment, top-k with averaged clip softmax, training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import fbank_rows, frame_ids, indexed_fbank, write_cache

from stella_cli.cache import CacheSpec
from stella_cli.config import DataConfig, HeadConfig, ModelConfig, resolve_model_preset
from stella_cli.downstream import feature_batches, fit, one_second, one_second_rows, topk_correct, warmup_cosine
from stella_cli.model import CAVMAE, Classifier
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
    fitted = fit(head, cfg, feature_batches(x[:160], y[:160], 32, seed=0), 5, F.cross_entropy)
    losses = fitted.losses
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0] and fitted.epoch == 8 and fitted.scores == {}
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
    from stella_cli.avs import AVSHead, frame_f_curve

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

    losses = fit(head, cfg, batches, 4, F.binary_cross_entropy_with_logits).losses
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        prob = torch.sigmoid(head(([tokens[64:]], audio[64:])))
    # F at the best threshold over the 32 test images; all-ones scores (1.3·0.0625) / (0.3·0.0625 + 1) = 0.08
    assert frame_f_curve(prob, masks[64:]).mean(0).max() > 0.7


# ----------------------------------------------------------------------------------------------------------
# the head loop: weight decay groups, epoch selection


def test_weight_decay_spares_biases_and_norm_weights():
    """One step of a zero loss: Adam's update is 0, so AdamW only decays: w <- w·(1 - lr·wd) for the three weight
    matrices of the Classifier; its biases and LayerNorm weight and bias stay (the authors' get_parameter_groups)."""
    torch.manual_seed(0)
    head = Classifier(4, 3)
    for param in head.parameters():
        torch.nn.init.uniform_(param, 1.0, 2.0)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    cfg = HeadConfig(epochs=1, lr=0.1, weight_decay=0.5, warmup_epochs=0)  # LR factor 1 at step 0

    def batches(epoch):
        yield torch.ones(2, 4), torch.zeros(2)

    fit(head, cfg, batches, 1, lambda out, y: 0.0 * out.sum())
    decayed = {n for n, p in head.named_parameters() if not torch.equal(p, before[n])}
    assert decayed == {"pooler.dense.weight", "fc1.weight", "classifier.4.weight"}
    for n in decayed:
        torch.testing.assert_close(dict(head.named_parameters())[n], before[n] * (1 - 0.1 * 0.5))


def test_best_test_keeps_the_first_epoch_with_the_best_test_score():
    """5 epochs, eval_every 2: scored after epochs 2, 4 and 5 (the last); 0.7 at epoch 4 ties with the later 0.7,
    so epoch 4's head is kept, as the authors' run.py keeps the first best."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    torch.manual_seed(0)
    head = Classifier(4, 2)
    states = {}
    scores = iter([0.5, 0.7, 0.7])

    def remember(epoch, loss):
        states[epoch + 1] = {k: v.clone() for k, v in head.state_dict().items()}

    cfg = HeadConfig(epochs=5, lr=1e-2, warmup_epochs=0, select_epoch="best_test", eval_every=2)
    fitted = fit(head, cfg, feature_batches(x, y, 8, seed=0), 2, F.cross_entropy, on_epoch=remember,
                 evaluate=lambda: next(scores))
    assert fitted.epoch == 4 and fitted.scores == {2: 0.5, 4: 0.7, 5: 0.7}
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, states[4][k])
    assert not torch.equal(states[4]["fc1.weight"], states[5]["fc1.weight"])


# ----------------------------------------------------------------------------------------------------------
# what each task feeds the model: frames, seconds of audio, windows (made-up caches whose values are indices)


def test_one_second_of_the_clip_fbank_equals_the_fbank_of_that_second():
    """The authors compute the fbank of the 1 s waveform (its mean removed); ours cuts the clip's fbank: the same 98
    rows where the second starts on the 10 ms grid, because every Kaldi frame removes its own DC offset."""
    from stella_cli.audio import kaldi_fbank

    t = torch.arange(3 * 16000, dtype=torch.float64) / 16000
    wave = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.sin(2 * math.pi * 97 * t ** 2) + 0.05
    clip = kaldi_fbank(wave - wave.mean(), 16000, 16).numpy()  # (298, 16)
    assert one_second_rows(16000) == 98
    second = wave[16000:32000]
    theirs = kaldi_fbank(second - second.mean(), 16000, 16).numpy()  # (98, 16)
    ours = one_second(clip, 16000, 16000, 128)
    left = (128 - 98) // 2
    assert np.abs(ours[:left]).max() == 0 and np.abs(ours[left + 98:]).max() == 0  # 15 zero rows each side
    np.testing.assert_allclose(ours[left:left + 98], theirs, atol=1e-4)
    assert one_second(clip, 15921, 16000, 128)[left, 0] == clip[100, 0]  # nearest frame start: 99.5 -> 100


def test_the_probe_tests_windows_starting_at_0_2_4_and_6_seconds(tmp_path):
    from stella_cli.probe import ProbeDataset

    spec = CacheSpec(num_frames=80, frame_size=4, fps=8.0, clip_seconds=10.0, target_length=16, num_mel_bins=2)
    root = write_cache(tmp_path / "d", spec, {"train": [{}], "test": [{}]})
    data = DataConfig(dataset="synthetic", root=str(root), image_size=4, num_frames=4, frame_stride=8,
                      target_length=16, num_mel_bins=2)
    item = ProbeDataset(data, "test", HeadConfig(), train=False, seed=0)[0]
    assert frame_ids(item["video"]) == [[s + k for k in (0, 8, 16, 24)] for s in (0, 16, 32, 48)]


def test_the_probe_training_audio_gets_spec_augment_noise_then_roll(tmp_path):
    """SpecAugment fills with the normalised 0; then U(0,1)·r/10 noise with one r per clip; then a roll by an
    integer in [-T, T): all draws, in this order, from the item's generator."""
    from stella_cli.probe import ProbeDataset, spec_augment

    spec = CacheSpec(num_frames=8, frame_size=4, fps=4.0, clip_seconds=2.0, target_length=32, num_mel_bins=4)
    root = write_cache(tmp_path / "d", spec, {"train": [{}]})
    data = DataConfig(dataset="synthetic", root=str(root), image_size=4, num_frames=2, frame_stride=1,
                      target_length=32, num_mel_bins=4)
    ds = ProbeDataset(data, "train", HeadConfig(freqm=2, timem=8), train=True, seed=0)
    out = ds.load_audio(0, torch.Generator().manual_seed(5))[0].numpy()
    g = torch.Generator().manual_seed(5)
    clean = (indexed_fbank(spec) + 5.081) / 4.4849
    masked = spec_augment(clean, 2, 8, 5.081 / 4.4849, g)
    noise, r = torch.rand((32, 4), generator=g).numpy(), float(torch.rand((), generator=g))
    shift = int(torch.randint(-32, 32, (), generator=g))
    np.testing.assert_allclose(out, np.roll(masked + noise * r / 10, shift, axis=0), rtol=1e-6, atol=1e-6)
    assert 0 < r / 10 < 0.1 and shift != 0


class ColourFeatures(torch.nn.Module):
    """A stand-in backbone: joint_embed = a fixed random mixing (to 2D = 16 features) of the mean of each colour
    channel and of the audio."""

    embed_dim = 8

    def __init__(self):
        super().__init__()
        self.mixing = torch.nn.Parameter(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)))

    def joint_embed(self, audio, video):
        return torch.cat([video.mean((1, 3, 4)), audio.mean((1, 2, 3))[:, None]], dim=1) @ self.mixing


def colour_clips(spec, n, seed):
    """n clips per class of 4: the class is the frame colour (red, green, blue, grey) with a random shade."""
    rng = np.random.default_rng(seed)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [120, 120, 120]])
    clips = []
    for label in range(4):
        for _ in range(n):
            colour = np.clip(base[label] + rng.normal(0, 25, 3), 0, 255).astype(np.uint8)
            frames = np.broadcast_to(colour, (spec.num_frames, spec.frame_size, spec.frame_size, 3)).copy()
            clips.append({"label": label, "frames": frames})
    return clips


@pytest.mark.parametrize("select", ["last", "best_test"])
def test_the_classification_head_separates_classes_the_features_carry(tmp_path, select):
    """The probe end to end (its data, augmentations, head loop, test windows) on features that carry the class
    only through the colour, which the head has to map to 4 classes: top-1 far above the 25 % of chance."""
    from stella_cli.probe import train_and_test

    spec = CacheSpec(num_frames=8, frame_size=4, fps=4.0, clip_seconds=2.0, target_length=32, num_mel_bins=4)
    root = write_cache(tmp_path / "d", spec, {"train": colour_clips(spec, 12, 0), "test": colour_clips(spec, 4, 1)},
                       num_classes=4)
    data = DataConfig(dataset="synthetic", root=str(root), image_size=4, num_frames=2, frame_stride=1,
                      target_length=32, num_mel_bins=4)
    cfg = HeadConfig(epochs=10, lr=2e-2, warmup_epochs=1, batch_size=8, freqm=2, timem=8, test_clips=2,
                     select_epoch=select)
    out = train_and_test(ColourFeatures(), data, cfg, seed=0)
    assert out["videos"] == 16 and out["classes"] == 4 and out["chance_top1"] == 25.0
    assert out["top1"] >= 87.5, out  # at most 2 of the 16 test videos wrong
    if select == "last":
        assert out["tested_epoch"] == 10 and out["test_score_per_epoch"] == {}
    else:  # scored every epoch on the test videos' middle window; the best epoch is tested
        scores = out["test_score_per_epoch"]
        assert sorted(scores) == list(range(1, 11)) and scores[out["tested_epoch"]] == max(scores.values())


@pytest.mark.parametrize("train_crop", [False, True])
def test_the_ave_head_learns_event_and_background_segments(tmp_path, train_crop):
    """The AVE task end to end on 2 s clips whose coloured object shows in the second second, the event's (the
    first is black): the head must tell background from the 4 categories (all-background scores 50 %); with
    train_crop every epoch recomputes the cropped training segments' features."""
    from stella_cli.ave import train_and_test
    from stella_cli.config import AVEHeadConfig

    spec = CacheSpec(num_frames=8, frame_size=8, fps=4.0, clip_seconds=2.0, target_length=208, num_mel_bins=4)
    clips = {split: colour_clips(spec, n, seed) for split, n, seed in (("train", 12, 0), ("test", 4, 1))}
    for clip in clips["train"] + clips["test"]:
        clip["frames"][:4] = 0  # second 0: nothing to see
        clip["event"], clip["fbank"] = (1.0, 2.0), np.full((208, 4), -5.081, np.float32)  # normalised audio 0
    root = write_cache(tmp_path / "d", spec, clips, dataset="ave", num_classes=4)
    data = DataConfig(dataset="ave", root=str(root), image_size=4, num_frames=2, frame_stride=1,
                      target_length=208, num_mel_bins=4)
    cfg = AVEHeadConfig(epochs=8, lr=1e-2, warmup_epochs=1, batch_size=4, train_crop=train_crop)
    out = train_and_test(ColourFeatures(), data, cfg, seed=0, batch_size=16)
    assert out["videos"] == 16 and out["segments_per_video"] == 2 and out["background_share"] == 50.0
    assert out["accuracy"] >= 90.0 and out["accuracy_event_segments"] >= 80.0, out


def test_ave_segments_read_their_second_of_frames_and_the_authors_audio_starts(tmp_path):
    """3 s clips at 8 fps: segment s shows cached frames 8s + 0, 2, 4, 6; its audio starts at sample
    int(linspace(0, 48000 - 17600, 3)) = 0, 15199, 30399 (nearest rows 0, 95, 190) or at s seconds (rows 0, 100,
    200), 98 rows each, padded 111 + 111 to the 320 rows of the model's input."""
    from stella_cli.ave import SegmentDataset

    spec = CacheSpec(num_frames=24, frame_size=4, fps=8.0, clip_seconds=3.0, target_length=320, num_mel_bins=2)
    root = write_cache(tmp_path / "d", spec, {"train": [{"event": (1.0, 2.0)}]}, dataset="ave")
    data = DataConfig(dataset="ave", root=str(root), image_size=4, num_frames=4, frame_stride=1,
                      target_length=320, num_mel_bins=2)
    for mode, first_rows in (("authors", [0, 95, 190]), ("seconds", [0, 100, 200])):
        item = SegmentDataset(data, "train", seed=0, audio_starts=mode)[0]
        assert frame_ids(item["video"]) == [[8 * s + k for k in (0, 2, 4, 6)] for s in range(3)]
        for s, first in enumerate(first_rows):
            assert fbank_rows(item["audio"][s]) == [0] * 111 + list(range(first + 1, first + 99)) + [0] * 111
        assert item["label"].tolist() == [1, 0, 1]  # background (1 class -> 1), the event second, background


# ----------------------------------------------------------------------------------------------------------
# AVS: the annotated frames, their second of audio, the decoder's inputs and AVSBench's metrics


def test_avs_items_pair_annotated_frame_k_with_its_window_second_and_mask(tmp_path):
    """5 s clips at 8 fps: AVSBench's frame k is at k + 15/16 s -> cached frames 7, 15, 23, 31, 39. The item of
    frame k: frames k, k+1, ... (the last repeated), audio rows [100k, 100k + 98) padded 207 + 207 to 512, mask k.
    Training uses frame 0 only."""
    from stella_cli.avs import MaskDataset

    spec = CacheSpec(num_frames=40, frame_size=4, fps=8.0, clip_seconds=5.0, target_length=512, num_mel_bins=2)
    test_masks = np.zeros((1, 5, 4, 4), np.uint8)
    for k in range(5):
        test_masks[0, k].flat[:k + 1] = 1  # mask k has k + 1 pixels
    root = write_cache(tmp_path / "d", spec, {"train": [{}], "test": [{}]}, dataset="avs",
                       masks={"train": test_masks[:, :1], "test": test_masks})
    data = DataConfig(dataset="avs", root=str(root), image_size=4, num_frames=4, frame_stride=8,
                      target_length=512, num_mel_bins=2)
    test = MaskDataset(data, "test", seed=0, all_frames=True)
    assert len(test) == 5 and test.annotated.tolist() == [7, 15, 23, 31, 39]
    windows = [[7, 15, 23, 31], [15, 23, 31, 39], [23, 31, 39, 39], [31, 39, 39, 39], [39, 39, 39, 39]]
    for k in range(5):
        item = test[k]
        assert frame_ids(item["video"]) == windows[k]
        assert fbank_rows(item["audio"]) == [0] * 207 + list(range(100 * k + 1, 100 * k + 99)) + [0] * 207
        assert item["mask"].sum() == k + 1 and item["clip"] == 0
    train = MaskDataset(data, "train", seed=0)
    assert len(train) == 1 and frame_ids(train[0]["video"]) == windows[0] and train[0]["mask"].sum() == 1


def test_avs_synthetic_masks_are_the_box_of_the_annotated_frame(tmp_path):
    """Box i reaches x1 = (i + 1)/40: a 4-pixel-wide mask has a column per centre 0.125, 0.375, ... <= x1, so the
    annotated frames 7, 15, 23, 31, 39 give 1, 2, 2, 3, 4 columns (frames 0, 8, 16, 24, 32 would give 0, 1, 2, 3, 3)."""
    from stella_cli.avs import MaskDataset

    spec = CacheSpec(num_frames=40, frame_size=4, fps=8.0, clip_seconds=5.0, target_length=512, num_mel_bins=2)
    boxes = np.array([[0.0, 0.0, (i + 1) / 40, 1.0] for i in range(40)], np.float32)
    root = write_cache(tmp_path / "d", spec, {"train": [{"boxes": boxes}], "test": [{"boxes": boxes}]})
    data = DataConfig(dataset="synthetic", root=str(root), image_size=4, num_frames=4, frame_stride=8,
                      target_length=512, num_mel_bins=2)
    test = MaskDataset(data, "test", seed=0, all_frames=True)
    assert [int(test[k]["mask"].sum()) // 4 for k in range(len(test))] == [1, 2, 2, 3, 4]


def test_avs_features_are_frame_0_tokens_and_the_audio_mean_before_the_norm():
    """Tiny model, 2 frames of 32 x 32 (grid 2: 4 tokens a frame), 32 x 32 fbank (4 audio tokens): the joint
    sequence is [audio 0-3 | frame 0: 4-7 | frame 1: 8-11]; the decoder gets tokens 4-7 at fc2's input, and the
    audio guide is the mean of the fusion output's tokens 0-3 before the final norm."""
    from stella_cli.avs import fusion_features

    torch.manual_seed(0)
    model = CAVMAE(resolve_model_preset(ModelConfig(preset="tiny")), num_frames=2, image_size=32, target_length=32,
                   num_mel_bins=32).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)
        model.norm.bias.uniform_(-1.0, 1.0)
    g = torch.Generator().manual_seed(1)
    audio, video = torch.randn(2, 1, 32, 32, generator=g), torch.randn(2, 2, 3, 32, 32, generator=g)
    seen = []
    hook = model.blocks_u[0].mlp.fc2.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        e_a, _ = model.joint_codes(*model.unimodal_codes(audio, video))
    hook.remove()
    tokens, guide = fusion_features(model, audio, video, amp=None)
    assert seen[0].shape == (2, 12, 128) and len(tokens) == 1
    torch.testing.assert_close(tokens[0], seen[0][:, 4:8])
    torch.testing.assert_close(guide, e_a.mean(1))
    assert not torch.allclose(guide, model.norm(e_a).mean(1), atol=1e-3)


def test_avsbench_miou_and_f_score_by_hand():
    """Four 2 x 2 frames of two videos, one batch of both (AVSBench's test batch) or one batch each.

    frame 0 (video 0): target [1 1 / 0 0], prob [.9 .5 / .6 .2]: > 0.5 predicts {0, 2}: IoU 1 / 3.
    frame 1 (video 0): target empty, prob [.9 .1 / .1 .1]: 3 of 4 pixels background -> IoU 3 / 4 (not 0).
    frame 2 (video 1): target [1 0 / 0 0], prob [.55 .4 / .4 .4]: IoU 1.
    frame 3 (video 1): target empty, prob all .2: IoU 4 / 4 = 1.
    F (β² = 0.3) leaves the empty frames 1 and 3 out. Thresholds t_i = i/254 (float32).
    frame 0: t <= .2: P = 2/4, R = 1 -> F = 1.3·.5 / (.15 + 1) = .5652; .2 < t <= .5: P = 2/3 -> .7222;
             .5 < t <= .6: hits {0, 2}: P = R = 1/2 -> .5; .6 < t <= .9: hits {0}: P = 1, R = 1/2 -> .8125; else 0.
    frame 2: t <= .4: P = 1/4 -> 1.3·.25 / (.075 + 1) = .3023; .4 < t <= .55: P = 1 -> 1; else 0.
    One batch of both videos: its best threshold is in (.4, .5]: (.7222 + 1) / 2 = .8611; one batch per video:
    each its own threshold, (.8125 + 1) / 2 = .90625."""
    from stella_cli.avs import batch_scores, frame_f_curve, frame_iou

    target = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]]).float()
    prob = torch.tensor([[[.9, .5], [.6, .2]], [[.9, .1], [.1, .1]], [[.55, .4], [.4, .4]], [[.2, .2], [.2, .2]]])
    iou = frame_iou(prob, target)
    assert iou.tolist() == pytest.approx([1 / 3, 3 / 4, 1.0, 1.0], abs=1e-6)
    curve = frame_f_curve(prob, target)
    t = torch.linspace(0, 1 - 1e-10, 255)
    assert curve[0, t <= .2].unique().tolist() == pytest.approx([1.3 * .5 / 1.15])
    assert curve[0, (t > .2) & (t <= .5)].unique().tolist() == pytest.approx([1.3 * (2 / 3) / (.2 + 1)])
    assert curve[0, (t > .5) & (t <= .6)].unique().tolist() == pytest.approx([.5])
    assert curve[0, (t > .6) & (t <= .9)].unique().tolist() == pytest.approx([1.3 * .5 / (.3 + .5)])
    assert curve[2, t <= .4].unique().tolist() == pytest.approx([1.3 * .25 / 1.075])
    assert curve[2, (t > .4) & (t <= .55)].unique().tolist() == pytest.approx([1.0])
    assert curve[1].abs().max() == 0 and curve[0, t > .9].abs().max() == 0 and curve[2, t > .55].abs().max() == 0
    empty = torch.tensor([False, True, False, True])
    video = torch.tensor([0, 0, 1, 1])
    miou, f = batch_scores(iou, curve, empty, video, videos_per_batch=2)
    assert miou == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 + 1) / 4, abs=1e-4)
    assert f == pytest.approx(100 * (1.3 * (2 / 3) / 1.2 + 1) / 2)
    miou, f = batch_scores(iou, curve, empty, video, videos_per_batch=1)
    assert miou == pytest.approx(100 * ((1 / 3 + 3 / 4) / 2 + 1) / 2, abs=1e-4) and f == pytest.approx(90.625)
    # a batch whose frames are all empty scores F = 0 (AVSBench's score starts at zeros)
    assert batch_scores(iou[1:2], curve[1:2], empty[1:2], video[1:2], 4) == pytest.approx((75.0, 0.0), abs=1e-4)


def test_avs_cached_features_train_the_same_head_as_the_loader(tmp_path, monkeypatch):
    """Features that fit in memory are computed once and batched in the loader's order: the losses and scores equal
    those of the path that runs the backbone at every pass."""
    from stella_cli import avs
    from stella_cli.config import AVSHeadConfig

    spec = CacheSpec(num_frames=16, frame_size=32, fps=8.0, clip_seconds=2.0, target_length=208, num_mel_bins=16)
    rng = np.random.default_rng(0)
    clips = [{"frames": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
              "boxes": np.tile(np.array([[0.1, 0.2, 0.5, 0.7]], np.float32), (16, 1))} for _ in range(6)]
    root = write_cache(tmp_path / "d", spec, {"train": clips[:4], "test": clips[4:]})
    data = DataConfig(dataset="synthetic", root=str(root), image_size=32, num_frames=2, frame_stride=8,
                      target_length=208, num_mel_bins=16)
    torch.manual_seed(0)
    model = CAVMAE(resolve_model_preset(ModelConfig(preset="tiny")), num_frames=2, image_size=32, target_length=208,
                   num_mel_bins=16).eval()
    cfg = AVSHeadConfig(epochs=2, lr=1e-2, warmup_epochs=0, batch_size=3, channels=4, select_epoch="best_test",
                        eval_every=1)
    cached = avs.train_and_test(model, data, cfg, seed=3)
    monkeypatch.setattr(avs, "CACHE_BYTES", 0)
    streamed = avs.train_and_test(model, data, cfg, seed=3)
    assert cached["frames"] == streamed["frames"] == 4  # 2 test clips x 2 annotated frames
    for key in ("loss_per_epoch", "mIoU", "F"):
        assert cached[key] == pytest.approx(streamed[key], rel=1e-5), key
    assert cached["test_score_per_epoch"] == pytest.approx(streamed["test_score_per_epoch"], rel=1e-5)
