"""The synthetic benchmark (synth.py): determinism, layout, ground truth and the phenomena it must show."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from stella_cli.cache import (DONE, PENDING, SPLITS, CacheSpec, SplitReader, disk_bytes, read_manifest, read_meta,
                              spec_from_meta)
from stella_cli.errors import StellaError
from stella_cli.synth import (SynthConfig, class_identities, clip_boxes, plan_clip, prepare_synthetic, render_video,
                              synth_clip, synth_fbank)

TINY = SynthConfig(num_classes=4, num_tasks=2, train_per_class=3, test_per_class=2, retrieval_per_class=2)


def arrays(root, split):
    d = root / "cache" / split
    return {name: np.load(d / f"{name}.npy") for name in ("frames", "fbank", "boxes", "status", "objects")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny benchmark made with 2 worker processes, and again in-process."""
    root = tmp_path_factory.mktemp("synth")
    two = prepare_synthetic(root / "w2", seed=0, workers=2, config=TINY)
    one = prepare_synthetic(root / "w1", seed=0, workers=1, config=TINY)
    return root, two, one


def test_bit_identical_for_any_worker_count(tiny):
    root, _, _ = tiny
    for split in SPLITS:
        a, b = arrays(root / "w2", split), arrays(root / "w1", split)
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), (split, name)
        assert (root / "w2" / f"{split}.csv").read_text() == (root / "w1" / f"{split}.csv").read_text()
    assert read_meta(root / "w2") == read_meta(root / "w1")


def test_same_seed_same_clip_other_seed_other_clip():
    a, b = synth_clip(TINY, 0, "train", 1, 2), synth_clip(TINY, 0, "train", 1, 2)
    c = synth_clip(TINY, 1, "train", 1, 2)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.wave, b.wave) and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.frames, c.frames) and not np.array_equal(a.wave, c.wave)
    assert a.plan.event != c.plan.event
    # clip k of a class does not depend on how many clips per class are made, nor on the split
    bigger = dataclasses.replace(TINY, train_per_class=10)
    assert np.array_equal(synth_clip(bigger, 0, "train", 1, 2).frames, a.frames)
    assert not np.array_equal(synth_clip(TINY, 0, "test", 1, 2).frames, a.frames)


def test_split_sizes_summary_and_meta(tiny):
    root, summary, _ = tiny
    out = root / "w2"
    assert summary["out"] == str(out)
    assert summary["splits"] == {"train": {"task1": 6, "task2": 6}, "test": {"task1": 4, "task2": 4},
                                 "retrieval": {"task1": 4, "task2": 4}}
    assert summary["skipped"] == {"train": 0, "test": 0, "retrieval": 0}
    assert summary["generated"] == 12 + 8 + 8 and summary["seconds"] > 0
    assert summary["bytes"] == disk_bytes(out) == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    meta = read_meta(out)
    assert meta["dataset"] == "synthetic" and meta["tasks"] == ["task1", "task2"] and meta["splits"] == list(SPLITS)
    assert [c["index"] for c in meta["classes"]] == [0, 1, 2, 3]
    assert [c["task"] for c in meta["classes"]] == ["task1", "task1", "task2", "task2"]
    assert all(set(c) == {"index", "name", "category", "task"} for c in meta["classes"])
    assert len({c["name"] for c in meta["classes"]}) == 4
    assert spec_from_meta(meta) == CacheSpec(num_frames=32, frame_size=64, fps=8.0, clip_seconds=4.0,
                                             sample_rate=16000, target_length=384, num_mel_bins=128,
                                             frames_format="raw")
    assert meta["generator"]["seed"] == 0 and meta["generator"]["config"]["train_per_class"] == 3
    for split, per_class in (("train", 3), ("test", 2), ("retrieval", 2)):
        rows = read_manifest(out, split)
        assert sorted(r["row"] for r in rows) == list(range(4 * per_class))
        assert [sum(r["label"] == c for r in rows) for c in range(4)] == [per_class] * 4
        assert all(r["task"] == meta["classes"][r["label"]]["task"] == r["category"] for r in rows)
        assert all(r["labels"] == [r["label"]] and r["duration"] == 4.0 for r in rows)
        assert len({r["clip_id"] for r in rows}) == len(rows)
        a = arrays(out, split)
        assert a["frames"].shape == (4 * per_class, 32, 64, 64, 3) and a["fbank"].shape == (4 * per_class, 384, 128)
        assert (a["status"] == DONE).all() and a["fbank"].dtype == np.float16
    report = json.loads((out / "prep_report.json").read_text())
    assert report["splits"]["train"]["prepared"] == 12 and report["splits"]["train"]["skipped"] == []


def test_default_benchmark_settings():
    cfg = SynthConfig()
    assert (cfg.num_classes, cfg.num_tasks, cfg.classes_per_task, cfg.retrieval_per_class) == (20, 5, 4, 20)
    assert (cfg.num_frames, cfg.frame_size, cfg.target_length) == (32, 64, 384)
    ids = class_identities(cfg)
    assert len({(i.shape, i.colour, i.texture) for i in ids}) == 20  # every visual identity is unique
    assert len({round(i.f0) for i in ids}) == 20
    # pitch ranks interleave the tasks: each task spans low to high pitches
    for t in range(5):
        f0 = sorted(i.f0 for i in ids if i.task == f"task{t + 1}")
        assert f0[0] < 300 and f0[-1] > 800


def test_boxes_are_exactly_the_sounding_object(tiny):
    root, _, _ = tiny
    identities = class_identities(TINY)
    boxes = np.load(root / "w2" / "cache" / "train" / "boxes.npy")
    assert boxes.shape == (12, 32, 4) and boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    assert 0.07 < area.mean() < 0.11 and area.max() < 0.125  # a small part of the frame (side 0.3 +- 15%)
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2
    assert (np.linalg.norm(centres[:, -1] - centres[:, 0], axis=-1) * 64).mean() > 5  # it moves
    for label, k in ((0, 0), (2, 1), (3, 2)):
        plan = plan_clip(TINY, 0, "train", label, k)
        with_obj = render_video(plan, TINY, identities).astype(int)
        without = render_video(dataclasses.replace(plan, objects=plan.objects[1:]), TINY, identities).astype(int)
        changed = np.abs(with_obj - without).sum(-1) > 0  # (F, S, S) pixels of the sounding object
        box = clip_boxes(plan, TINY) * 64
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        for f in range(32):
            x0, y0, x1, y1 = box[f]
            inside = (xs > x0 - 1) & (xs < x1 + 1) & (ys > y0 - 1) & (ys < y1 + 1)
            assert not (changed[f] & ~inside).any()  # nothing drawn outside the box (1 px antialiasing)
            assert changed[f].sum() > 0.3 * (x1 - x0) * (y1 - y0)  # the object fills much of its box


def test_distractors_and_offscreen_sounds(tiny):
    root, _, _ = tiny
    cfg = dataclasses.replace(TINY, num_classes=8, num_tasks=4)
    task = np.arange(8) // 2
    objs = np.array([[o.cls for o in p.objects] + [p.offscreen] for p in
                     (plan_clip(cfg, 0, "train", c, k) for c in range(8) for k in range(20))])
    label, distract, off = objs[:, 0], objs[:, 1:3], objs[:, 3]
    assert (distract != label[:, None]).all() and (distract[:, 0] != distract[:, 1]).all()
    assert (task[distract] != task[label][:, None]).mean() > 0.5  # most distractors come from other tasks
    has_off = off >= 0
    assert 0.3 < has_off.mean() < 0.7
    assert not ((off[:, None] == objs[:, :3]) & has_off[:, None]).any()  # the off-screen sound is not on screen
    table = np.load(root / "w2" / "cache" / "train" / "objects.npy")
    rows = read_manifest(root / "w2", "train")
    assert table.shape == (12, 4) and all(table[r["row"], 0] == r["label"] for r in rows)


def _mel_bin(f: float, num_bins: int = 128) -> int:
    mel = lambda x: 1127 * np.log(1 + x / 700)  # noqa: E731
    edges = np.linspace(mel(20), mel(8000), num_bins + 2)
    centres = 700 * (np.exp(edges[1:-1] / 1127) - 1)
    return int(np.argmin(np.abs(centres - f)))


def test_sound_is_inside_the_event_window(tiny):
    root, _, _ = tiny
    identities = class_identities(TINY)
    reader = SplitReader(root / "w2", "train", spec_from_meta(read_meta(root / "w2")))
    t = np.arange(384) * 0.01 + 0.0125  # centre of each 25 ms fbank frame
    gaps = []
    for rec in read_manifest(root / "w2", "train"):
        assert 0 <= rec["event_start"] < rec["event_end"] <= 3.84
        assert 1.0 <= rec["event_end"] - rec["event_start"] <= 2.5
        plan = plan_clip(TINY, 0, "train", rec["label"], int(rec["clip_id"][-3:]))
        fb = reader.fbank(rec["row"])[:, _mel_bin(identities[rec["label"]].f0 * plan.f0_scale)]  # (T,)
        inside = (t >= rec["event_start"]) & (t <= rec["event_end"])
        gaps.append(fb[inside].mean() - fb[~inside].mean())
    assert min(gaps) > 1.5 and np.median(gaps) > 3.0  # log-power: > 4.5x, typically > 20x inside the event


def _ncm_accuracy(x_train, y_train, x_test, y_test) -> float:
    m, s = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - m) / s, (x_test - m) / s
    means = np.stack([x_train[y_train == c].mean(0) for c in np.unique(y_train)])
    pred = ((x_test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y_test).mean())


def _colour_hist(frames: np.ndarray) -> np.ndarray:
    q = frames.reshape(-1, 3) // 64
    return np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / len(q)


def test_categories_are_learnable_and_the_correlation_is_sparse():
    """Raw features separate the classes; for video only in the few patch tokens the ground-truth box covers."""
    cfg = dataclasses.replace(TINY, num_classes=8, num_tasks=4)
    identities = class_identities(cfg)
    rng = np.random.default_rng(0)
    t = np.arange(384) * 0.01 + 0.0125
    feats = {"audio": [], "box": [], "patch": [], "y": [], "split": []}
    touched = []  # fraction of the 4 x 4 grid of 16 px patch tokens that the sounding object's box touches
    for split, n in (("train", 5), ("test", 3)):
        for c in range(8):
            for k in range(n):
                clip = synth_clip(cfg, 0, split, c, k, identities)
                fb = synth_fbank(clip, cfg)
                inside = (t >= clip.plan.event[0]) & (t <= clip.plan.event[1])
                feats["audio"].append(fb[inside].mean(0))
                crops, patches = [], []
                for i in (0, 8, 16, 24):
                    x0, y0, x1, y1 = (clip.boxes[i] * 64).astype(int)
                    crops.append(_colour_hist(clip.frames[i, y0:y1, x0:x1]))
                    py, px = rng.integers(0, 4, size=2) * 16  # one random patch token of the frame
                    patches.append(_colour_hist(clip.frames[i, py:py + 16, px:px + 16]))
                    g = clip.boxes[i] * 4
                    touched.append((np.ceil(g[2]) - np.floor(g[0])) * (np.ceil(g[3]) - np.floor(g[1])) / 16)
                feats["box"].append(np.mean(crops, 0))
                feats["patch"].append(np.mean(patches, 0))
                feats["y"].append(c)
                feats["split"].append(split)
    y, tr = np.array(feats["y"]), np.array(feats["split"]) == "train"
    acc = {k: _ncm_accuracy(np.array(feats[k])[tr], y[tr], np.array(feats[k])[~tr], y[~tr])
           for k in ("audio", "box", "patch")}
    assert acc["audio"] >= 0.75  # chance 0.125
    assert acc["box"] >= 0.85
    assert 0.2 < np.mean(touched) < 0.35  # the object touches 4 or 6 of the 16 patch tokens, never all
    assert acc["patch"] < acc["box"] - 0.3  # most patch tokens carry background or distractors, not the category


def test_resume_skips_done_rows_and_refuses_other_settings(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "resume"
    shutil.copytree(root / "w1", out)
    status = np.load(out / "cache" / "train" / "status.npy", mmap_mode="r+")
    frames = np.load(out / "cache" / "train" / "frames.npy", mmap_mode="r+")
    status[[1, 4]] = PENDING
    frames[[1, 4]] = 0
    status.flush()
    frames.flush()
    summary = prepare_synthetic(out, seed=0, workers=1, config=TINY)
    assert summary["generated"] == 2
    for split in SPLITS:
        a, b = arrays(out, split), arrays(root / "w1", split)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(StellaError, match="meta.json.*different"):
        prepare_synthetic(out, seed=1, workers=1, config=TINY)


def test_quiet_and_bad_arguments(tmp_path, capsys):
    prepare_synthetic(tmp_path / "q", seed=3, workers=1, progress=False,
                      config=dataclasses.replace(TINY, train_per_class=1, test_per_class=1, retrieval_per_class=1))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    with pytest.raises(StellaError, match="--format"):
        prepare_synthetic(tmp_path / "x", fmt="avi", config=TINY)
    with pytest.raises(ValueError, match="num_tasks"):
        prepare_synthetic(tmp_path / "x", config=dataclasses.replace(TINY, num_tasks=3))


def test_mp4_format_goes_through_the_decoding_path(tiny, tmp_path):
    from stella_cli import media

    root, _, _ = tiny
    cfg = dataclasses.replace(TINY, train_per_class=1, test_per_class=1, retrieval_per_class=1)
    summary = prepare_synthetic(tmp_path / "mp4", seed=0, fmt="mp4", workers=1, config=cfg)
    direct = prepare_synthetic(tmp_path / "cache", seed=0, fmt="cache", workers=1, config=cfg)
    assert summary["splits"] == direct["splits"] and summary["skipped"] == {s: 0 for s in SPLITS}
    for split in SPLITS:
        rows = read_manifest(tmp_path / "mp4", split)
        assert [(r["clip_id"], r["event_start"]) for r in rows] == \
            [(r["clip_id"], r["event_start"]) for r in read_manifest(tmp_path / "cache", split)]
        a, b = arrays(tmp_path / "mp4", split), arrays(tmp_path / "cache", split)
        assert np.array_equal(a["boxes"], b["boxes"]) and (a["status"] == DONE).all()
        diff = np.abs(a["frames"].astype(float) - b["frames"].astype(float))
        assert diff.mean() < 5  # H.264 at crf 18 + yuv420p: close to the rendered frames
        fb_diff = np.abs(a["fbank"].astype(float) - b["fbank"].astype(float))
        assert np.median(fb_diff) < 0.3  # AAC round trip, aligned in time
    clip = media.decode_clip(tmp_path / "mp4" / rows[0]["source"], fps=8, num_frames=32, frame_size=64,
                             clip_seconds=4.0, sample_rate=16000)
    assert clip.frames.shape == (32, 64, 64, 3) and abs(len(clip.waveform) - 64000) <= 1024
