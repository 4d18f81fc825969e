"""The Dataset and the loader (data.py) on a tiny synthetic benchmark."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch.utils.data.distributed import DistributedSampler

from stella_cli.cache import SplitReader, read_meta, spec_from_meta
from stella_cli.config import DataConfig
from stella_cli.data import (IMAGENET_MEAN, IMAGENET_STD, AVDataset, build_loader, check_prepared, eval_start,
                             fixed_crop_offsets, frame_indices, multiscale_crop_box, num_batches, resized_crop,
                             shard_indices, window_starts)
from stella_cli.errors import StellaError
from stella_cli.synth import SynthConfig, prepare_synthetic

TINY = SynthConfig(num_classes=4, num_tasks=2, train_per_class=4, test_per_class=1, retrieval_per_class=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_synthetic(out, seed=0, workers=1, config=TINY)
    return out


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "synthetic", "root": str(root), "image_size": 64, "target_length": 384,
                         "num_workers": 0, **kw})


def unnormalise(video: torch.Tensor) -> torch.Tensor:
    return video * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def cached(root, split="train"):
    return SplitReader(root, split, spec_from_meta(read_meta(root)))


def test_eval_item_is_the_cache_normalised(root):
    ds = AVDataset(cfg_for(root), "train", train=False)
    assert len(ds) == 16
    item = ds[5]
    assert set(item) == {"video", "audio", "label", "task", "index"}
    assert item["video"].shape == (4, 3, 64, 64) and item["video"].dtype == torch.float32
    assert item["audio"].shape == (1, 384, 128) and item["audio"].dtype == torch.float32
    for key in ("label", "task", "index"):
        assert item[key].dtype == torch.int64 and item[key].shape == ()
    row = ds.records[5]["row"]
    assert int(item["label"]) == ds.records[5]["label"] == 1 and int(item["task"]) == 0 and int(item["index"]) == 5
    reader = cached(root)
    video = unnormalise(item["video"])
    assert video.min() >= -1e-5 and video.max() <= 1 + 1e-5
    frames = torch.from_numpy(reader.frames(row, [0, 8, 16, 24])).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(video, frames, atol=1e-5, rtol=0)  # middle window of 32 frames = 0, 8, 16, 24
    fbank = torch.from_numpy(reader.fbank(row))
    torch.testing.assert_close(item["audio"][0], (fbank + 5.081) / 4.4849)
    again = ds[5]
    assert all(torch.equal(item[k], again[k]) for k in item)  # evaluation is deterministic
    assert ds.boxes(5).shape == (32, 4) and ds.event(5)[0] < ds.event(5)[1]


def test_eval_resizes_to_image_size(root):
    ds = AVDataset(cfg_for(root, image_size=32), "retrieval", train=False)
    video = unnormalise(ds[0]["video"])
    frames = torch.from_numpy(cached(root, "retrieval").frames(ds.records[0]["row"], [0, 8, 16, 24]))
    expected = Fn.interpolate(frames.permute(0, 3, 1, 2).float() / 255, size=(32, 32), mode="bilinear",
                              align_corners=False, antialias=True)
    assert video.shape == (4, 3, 32, 32)
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=0)  # = torch's (and PIL's) antialiased bilinear
    crop = (frames.permute(0, 3, 1, 2).float() / 255)[:, :, 8:56, 0:56]  # enlarging a 56 x 48 crop
    expected = Fn.interpolate(crop, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(torch.from_numpy(resized_crop(crop.numpy(), 0, 0, 56, 48, 64)), expected, atol=1e-5,
                               rtol=0)


def test_task_filter_and_errors(root):
    ds = AVDataset(cfg_for(root), "retrieval", ["task2"], train=False)
    assert len(ds) == 4 and (ds.tasks == 1).all() and set(ds.labels.tolist()) == {2, 3}
    with pytest.raises(StellaError, match="task9"):
        AVDataset(cfg_for(root), "train", ["task9"], train=False)
    with pytest.raises(StellaError, match=r"target_length=384.*data.target_length=1024"):
        check_prepared(dataclasses.replace(cfg_for(root), target_length=1024))
    with pytest.raises(StellaError, match="num_mel_bins"):
        AVDataset(dataclasses.replace(cfg_for(root), num_mel_bins=64), "train", train=False)
    with pytest.raises(StellaError, match="frame_stride"):
        check_prepared(cfg_for(root, num_frames=5))  # 5 x 8 > 32 cached frames
    with pytest.raises(StellaError, match="data.dataset"):
        check_prepared(dataclasses.replace(cfg_for(root), dataset="vggsound"))


def test_missing_data_names_the_prep_command(tmp_path):
    missing = tmp_path / "data" / "synthetic"
    cfg = cfg_for(missing)
    with pytest.raises(StellaError, match=f"run `stella prep synthetic --out {missing}`"):
        check_prepared(cfg)
    with pytest.raises(StellaError, match="stella prep synthetic --out"):
        AVDataset(cfg, "train", train=True)
    vgg = dataclasses.replace(cfg, dataset="vggsound")
    with pytest.raises(StellaError, match="stella prep vggsound --list .* --out"):
        check_prepared(vgg)


def test_frame_window():
    assert window_starts(80, 4, 8) == range(48)  # the authors' starts 0 .. 5.875 s at 8 fps
    assert eval_start(80, 4, 8) == 24  # "middle" = 3 s
    assert frame_indices(24, 4, 8).tolist() == [24, 32, 40, 48]
    assert window_starts(32, 4, 8) == range(1) and eval_start(32, 4, 8) == 0


def test_train_window_is_uniform_inside_the_clip(root):
    ds = AVDataset(cfg_for(root, num_frames=2, frame_stride=8), "train", train=True, seed=3)
    starts = set()
    for epoch in range(200):
        idx = ds.sample_frames(ds.item_generator(0, epoch))
        assert idx[1] - idx[0] == 8 and 0 <= idx[0] and idx[-1] < 32
        starts.add(int(idx[0]))
    assert starts == set(range(16))  # 32 - 2 x 8 starts, all drawn
    assert ds.sample_frames(None).tolist() == [8, 16]


def test_train_augmentation_is_reproducible_and_changes_with_epoch(root):
    a = AVDataset(cfg_for(root), "train", train=True, seed=7)
    b = AVDataset(cfg_for(root), "train", train=True, seed=7)
    x, y = a[3], b[3]
    assert all(torch.equal(x[k], y[k]) for k in x)  # same (seed, epoch, index)
    a.set_epoch(1)
    z = a[3]
    assert not torch.equal(x["audio"], z["audio"])
    a.set_epoch(0)
    assert torch.equal(a[3]["audio"], x["audio"])
    c = AVDataset(cfg_for(root), "train", train=True, seed=8)
    assert not torch.equal(c[3]["audio"], x["audio"])
    s = set()
    for epoch in range(12):  # the crop changes the video in most epochs
        a.set_epoch(epoch)
        s.add(a[3]["video"].sum().item())
    assert len(s) >= 5


def test_multiscale_crop_is_shared_by_all_frames(root):
    ds = AVDataset(cfg_for(root, train_noise=False, train_time_roll=False), "train", train=True, seed=1)
    reader = cached(root)
    crops = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        video = unnormalise(ds[2]["video"])
        g = ds.item_generator(2, epoch)
        idx = ds.sample_frames(g)
        box = multiscale_crop_box(64, 64, 64, g)  # the same draws as the item
        crops.add(box)
        frames = reader.frames(ds.records[2]["row"], idx).transpose(0, 3, 1, 2).astype(np.float32) / 255
        torch.testing.assert_close(video, torch.from_numpy(resized_crop(frames, *box, 64)), atol=1e-5, rtol=0)
        assert box[2] in (64, 56, 48) and box[3] in (64, 56, 48)
    assert len(crops) > 1
    # audio untouched with both audio switches off
    torch.testing.assert_close(ds[2]["audio"][0], (torch.from_numpy(reader.fbank(ds.records[2]["row"])) + 5.081)
                               / 4.4849)


def test_crop_geometry_of_the_authors():
    assert fixed_crop_offsets(256, 256, 224, 224) == [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16), (0, 16),
                                                      (32, 16), (16, 32), (16, 0), (8, 8), (24, 8), (8, 24),
                                                      (24, 24)]
    g = torch.Generator().manual_seed(0)
    sizes = {multiscale_crop_box(256, 256, 224, g)[2:] for _ in range(400)}
    # sides {256, 224, 192}, at most one step apart
    assert sizes == {(256, 256), (224, 256), (256, 224), (224, 224), (192, 224), (224, 192), (192, 192)}


def test_audio_noise_and_roll(root):
    reader = cached(root)
    clean = (torch.from_numpy(reader.fbank(0)) + 5.081) / 4.4849  # (T, M)
    noisy = AVDataset(cfg_for(root, train_time_roll=False, multiscale_crop=False), "train", train=True)
    d = noisy[0]["audio"][0] - clean
    assert d.min() >= 0 and 0 < d.max() < 0.1  # U(0,1) * r / 10
    rolled = AVDataset(cfg_for(root, train_noise=False, multiscale_crop=False), "train", train=True)
    shifts = []
    for epoch in range(6):
        rolled.set_epoch(epoch)
        a = rolled[0]["audio"][0]
        profile, ref = a[:, :8].sum(1).numpy(), clean[:, :8].sum(1).numpy()  # cheap prefilter of the shifts
        candidates = [s for s in range(-384, 384) if np.allclose(np.roll(ref, s), profile)]
        match = [s for s in candidates if torch.equal(a, torch.roll(clean, s, dims=0))]
        assert match
        shifts.append(match[0])
    assert len(set(shifts)) > 1


def test_switches_off_train_equals_eval(root):
    off = cfg_for(root, train_noise=False, train_time_roll=False, multiscale_crop=False)
    tr, ev = AVDataset(off, "train", train=True), AVDataset(off, "train", train=False)
    assert all(torch.equal(tr[4][k], ev[4][k]) for k in ("video", "audio"))  # one window start in 32 frames


def test_sharding_matches_distributed_sampler():
    for n, world, drop_last in ((10, 2, True), (11, 2, True), (11, 2, False), (13, 4, False), (5, 3, True)):
        shards = [shard_indices(n, shuffle=True, seed=5, epoch=2, drop_last=drop_last, rank=r, world_size=world)
                  for r in range(world)]
        for r in range(world):
            ref = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=5, drop_last=drop_last)
            ref.set_epoch(2)
            assert shards[r] == list(ref)
        assert len({len(s) for s in shards}) == 1  # equal size on every rank
        if drop_last:
            flat = [i for s in shards for i in s]
            assert len(flat) == len(set(flat)) == (n // world) * world  # disjoint
    assert shard_indices(6, shuffle=False, seed=0, epoch=0, drop_last=True) == list(range(6))
    assert shard_indices(6, shuffle=True, seed=0, epoch=0, drop_last=True) != \
        shard_indices(6, shuffle=True, seed=0, epoch=1, drop_last=True)


def test_loader_ranks_are_disjoint_and_equal(root):
    ds = AVDataset(cfg_for(root), "train", train=True, seed=0)
    seen = []
    for rank in range(2):
        loader = build_loader(ds, 3, shuffle=True, seed=1, epoch=0, drop_last=True, num_workers=0, rank=rank,
                              world_size=2)
        batches = [b["index"].tolist() for b in loader]
        assert len(batches) == len(loader) == num_batches(16, 3, drop_last=True, world_size=2) == 2
        seen.append([i for b in batches for i in b])
    assert len(seen[0]) == len(seen[1]) == 6 and not set(seen[0]) & set(seen[1])
    assert num_batches(16, 3, drop_last=False, world_size=2) == 3 and num_batches(16, 4, drop_last=True) == 4


def test_start_batch_resumes_the_epoch(root):
    ds = AVDataset(cfg_for(root), "train", train=True, seed=0)
    full = list(build_loader(ds, 4, shuffle=True, seed=2, epoch=3, drop_last=True, num_workers=0))
    tail = list(build_loader(ds, 4, shuffle=True, seed=2, epoch=3, drop_last=True, num_workers=0, start_batch=2))
    assert len(full) == 4 and len(tail) == 2
    for a, b in zip(full[2:], tail):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="start_batch"):
        build_loader(ds, 4, shuffle=True, seed=2, epoch=3, drop_last=True, num_workers=0, start_batch=5)


def test_batches_do_not_depend_on_workers(root):
    ds = AVDataset(cfg_for(root), "train", train=True, seed=0)
    state = torch.random.get_rng_state()
    zero = list(build_loader(ds, 4, shuffle=True, seed=0, epoch=1, drop_last=True, num_workers=0))
    two = list(build_loader(ds, 4, shuffle=True, seed=0, epoch=1, drop_last=True, num_workers=2))
    assert len(zero) == len(two) == 4
    for a, b in zip(zero, two):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ds.set_epoch(1)
    items = [ds[int(i)] for i in zero[0]["index"]]
    assert all(torch.equal(zero[0][k], torch.stack([it[k] for it in items])) for k in items[0])  # the batch = items
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched


def test_jpeg_cache_reads_like_raw(root, tmp_path):
    cfg = dataclasses.replace(TINY, train_per_class=1, test_per_class=1, retrieval_per_class=1)
    prepare_synthetic(tmp_path / "raw", seed=0, workers=1, config=cfg)
    prepare_synthetic(tmp_path / "jpeg", seed=0, workers=1, config=cfg, frames_format="jpeg")
    a = AVDataset(cfg_for(tmp_path / "raw"), "train", train=False)[1]
    b = AVDataset(cfg_for(tmp_path / "jpeg"), "train", train=False)[1]
    assert torch.equal(a["audio"], b["audio"])
    assert (unnormalise(a["video"]) - unnormalise(b["video"])).abs().mean() < 0.02  # JPEG q2
