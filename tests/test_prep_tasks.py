"""`stella prep ave` on made-up annotation files and real mp4s, and the AVE segments read back from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_clip, write_png

from stella_cli.ave import SegmentDataset, segment_accuracy, segment_labels
from stella_cli.cache import CacheSpec, check_folder, prep_command_of, read_manifest, read_meta
from stella_cli.config import DataConfig
from stella_cli.downstream import pad_segment
from stella_cli.errors import StellaError
from stella_cli.prep_downstream import prepare_ave, read_ave_list

TINY = CacheSpec(num_frames=8, frame_size=16, fps=4.0, clip_seconds=2.0, target_length=192, num_mel_bins=64)


def test_segment_labels_and_accuracy():
    # event 0.4 .. 2.6 s over 4 one-second segments: covers 0.6, 1.0, 0.6, 0.0 of them
    assert segment_labels((0.4, 2.6), 4, label=3, background=9).tolist() == [3, 3, 3, 9]
    assert segment_labels((0.6, 1.4), 3, label=1, background=5).tolist() == [5, 5, 5]  # 0.4 of two seconds each
    assert segment_labels((2.0, 10.0), 10, label=0, background=28).tolist() == [28, 28] + [0] * 8  # AVE's integers
    assert segment_accuracy(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [3, 4]])) == 75.0
    padded = pad_segment(np.ones((3, 2), np.float32), 8)
    assert padded[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]  # 2 zeros before, 3 after


def write_ave_lists(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                                            "Dog&vid_dog&good&0&1\nChurch bell&vid_bell&good&1&2\n"
                                            "Dog&vid_silent&good&0&2\nChurch bell&vid_gone&good&0&2\n"
                                            "Dog&vid_dog2&good&1&2\n")
    (folder / "trainSet.txt").write_text("Dog&vid_dog&good&0&1\nChurch bell&vid_bell&good&1&2\n"
                                         "Dog&vid_silent&good&0&2\nChurch bell&vid_gone&good&0&2\n")
    (folder / "testSet.txt").write_text("Dog&vid_dog2&good&1&2\n")


def test_prep_ave_reads_the_annotation_files_and_real_mp4s(tmp_path):
    videos = tmp_path / "AVE"
    for k, name in enumerate(("vid_dog", "vid_bell", "vid_dog2")):
        make_clip(videos / f"{name}.mp4", seconds=2.0, fps=8, seed=k)
    make_clip(videos / "vid_silent.mp4", audio=False)
    write_ave_lists(tmp_path / "ann")
    out = tmp_path / "ave_data"
    summary = prepare_ave(out, root=videos, annotations=tmp_path / "ann", workers=1, progress=False, spec=TINY)
    assert summary["splits"] == {"train": {"ave": 2}, "test": {"ave": 1}}
    reasons = {s["clip_id"]: s["reason"] for s in summary["skipped_clips"]["train"]}
    assert reasons == {"vid_gone": "no media file under --root", "vid_silent": "no audio stream"}
    meta = read_meta(out)
    assert meta["dataset"] == "ave" and meta["tasks"] == ["ave"]
    assert [c["name"] for c in meta["classes"]] == ["Church bell", "Dog"]
    train = {r["clip_id"]: r for r in read_manifest(out, "train")}
    bell = train["vid_bell"]
    assert bell["label"] == 0 and (bell["event_start"], bell["event_end"]) == (1, 2)
    # the segments of the cached clips: 2 one-second segments, 4 frames each, 1 s of fbank padded to 192 rows
    data = DataConfig(dataset="ave", root=str(out), image_size=16, num_frames=4, frame_stride=1, target_length=192,
                      num_mel_bins=64, num_workers=0)
    segments = SegmentDataset(data, "train", seed=0)
    item = segments[[r["clip_id"] for r in segments.records].index("vid_bell")]
    assert item["video"].shape == (2, 4, 3, 16, 16) and item["audio"].shape == (2, 1, 192, 64)
    assert item["label"].tolist() == [2, 0]  # background (2 classes -> index 2), then "Church bell"
    # the authors' second of segment 1 starts at int(linspace(0, 32000 - 17600, 2))[1] = 14400 samples = row 90
    fbank = np.load(out / "cache" / "train" / "fbank.npy", mmap_mode="r")[train["vid_bell"]["row"]].astype(np.float32)
    expected = (pad_segment(fbank[90:188], 192) + 5.081) / 4.4849
    np.testing.assert_allclose(item["audio"][1, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.allclose(item["audio"][1, 0, :47].numpy(), 5.081 / 4.4849)  # 98 rows padded by 47 zeros before
    assert check_folder(out)[1] == []  # `stella prep --check`
    ann = tmp_path / "ann"
    assert prep_command_of(out) == (f"stella prep ave --list train={ann / 'trainSet.txt'},test={ann / 'testSet.txt'},"
                                    f"annotations={ann / 'Annotations.txt'} --root {videos} --out {out}")


def test_ave_list_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "trainSet.txt"
    bad.write_text("Dog&vid&good&0&1\nDog&vid2&good&zero&1\n")
    with pytest.raises(StellaError, match=r"trainSet.txt:2: start and end must be seconds"):
        read_ave_list(bad)
    bad.write_text("Dog,vid,good,0,1\n")
    with pytest.raises(StellaError, match=r"trainSet.txt:1: expected category&video_id&quality&start&end"):
        read_ave_list(bad)
    (tmp_path / "testSet.txt").write_text("Dog&vid3&good&0&1\n")
    result = subprocess.run([sys.executable, "-m", "stella_cli", "prep", "ave", "--root", str(tmp_path), "--out",
                             str(tmp_path / "o")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "trainSet.txt:1: expected" in "".join(result.stdout.split("\n"))
    assert "Traceback" not in result.stdout + result.stderr


def test_prep_avs_reads_the_s4_csv_mask_pngs_and_real_mp4s(tmp_path):
    """AVSBench draws masks on its 224 x 224 frames, the whole video frame squashed to a square: a square mask of a
    32 x 24 video is stretched back to 4:3, then resized and centre-cropped like the frames."""
    from stella_cli.avs import MaskDataset
    from stella_cli.prep_downstream import prepare_avs

    videos, masks = tmp_path / "videos", tmp_path / "gt_masks"
    (tmp_path / "s4_meta_data.csv").write_text("name,category,split\nclipA,dog,train\nclipB,cat,train\n"
                                               "clipC,dog,test\nclipD,cat,train\nclipE,dog,val\nclipF,cat,test\n")
    for k, name in enumerate(("clipA", "clipB", "clipC", "clipD", "clipF")):
        make_clip(videos / f"{name}.mp4", seconds=2.0, fps=8, seed=k)  # 32 x 24 frames
    square = np.zeros((16, 16), np.uint8)
    square[4:12, 8:12] = 255  # on the 32 x 24 frame: x 16..24, y 6..18
    for name, split, cat, count in (("clipA", "train", "dog", 1), ("clipB", "train", "cat", 1),
                                    ("clipC", "test", "dog", 2), ("clipF", "test", "cat", 1)):
        for k in range(1, count + 1):  # clipD has no mask, clipF lacks its second test mask
            write_png(masks / split / cat / name / f"{name}_{k}.png", square if k == 1 else 255 - square)
    out = tmp_path / "avs_data"
    spec = CacheSpec(num_frames=8, frame_size=24, fps=4.0, clip_seconds=2.0, target_length=192, num_mel_bins=64)
    summary = prepare_avs(out, root=videos, meta_csv=tmp_path / "s4_meta_data.csv", masks=masks, workers=1,
                          progress=False, spec=spec)
    assert summary["splits"] == {"train": {"avs": 2}, "test": {"avs": 1}}
    assert summary["skipped_clips"]["train"][0]["reason"] == "no mask png clipD_1.png under --masks"
    assert summary["skipped_clips"]["test"][0]["reason"] == "no mask png clipF_2.png under --masks"
    cached = np.load(out / "cache" / "train" / "masks.npy")
    assert cached.shape == (2, 1, 24, 24) and np.load(out / "cache" / "test" / "masks.npy").shape == (1, 2, 24, 24)
    # frames: 32 x 24 -> Resize(24) keeps 32 x 24, CenterCrop(24) from x = 4: the object is at x 12..20, y 6..18
    # (only resized, as a square, it would be at x 12..18)
    expected = np.zeros((24, 24), np.uint8)
    expected[6:18, 12:20] = 1
    assert np.abs(cached[0, 0].astype(int) - expected).sum() <= 4  # bilinear edges
    test = np.load(out / "cache" / "test" / "masks.npy")
    assert np.abs(test[0, 0].astype(int) - expected).sum() <= 4 and np.abs(test[0, 1] + expected - 1).sum() <= 4
    data = DataConfig(dataset="avs", root=str(out), image_size=16, num_frames=2, frame_stride=1, target_length=192,
                      num_mel_bins=64, num_workers=0)
    item = MaskDataset(data, "train", seed=0)[0]
    assert item["mask"].shape == (16, 16) and item["mask"].sum() == pytest.approx(cached[0, 0].sum() * (16 / 24) ** 2,
                                                                                  rel=0.1)
    assert item["video"].shape == (2, 3, 16, 16) and item["audio"].shape == (1, 192, 64)
    assert len(MaskDataset(data, "test", seed=0, all_frames=True)) == 2  # both annotated frames of clipC
    assert check_folder(out)[1] == []  # `stella prep --check`
    assert prep_command_of(out) == (f"stella prep avs --list {tmp_path / 's4_meta_data.csv'} --masks {masks} "
                                    f"--root {videos} --out {out}")


def test_prep_msrvtt_reads_the_lists_and_skips_videos_without_audio(tmp_path):
    from stella_cli.prep_downstream import prepare_msrvtt, read_video_list

    videos, lists = tmp_path / "videos", tmp_path / "lists"
    for k in range(4):
        make_clip(videos / f"video{k}.mp4", seconds=2.0, fps=8, seed=k)
    make_clip(videos / "video9.mp4", audio=False)
    lists.mkdir()
    (lists / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo9\nvideo1\nvideo7\n")
    (lists / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n"
                                                    "ret0,msr2,video2,a man sings\nret1,msr3,video3,a dog\n")
    assert [v for v, _ in read_video_list(lists / "MSRVTT_JSFUSION_test.csv")] == ["video2", "video3"]
    summary = prepare_msrvtt(tmp_path / "msrvtt", root=videos, lists=lists, workers=1, progress=False, spec=TINY)
    assert summary["splits"] == {"train": {"msrvtt": 2}, "retrieval": {"msrvtt": 2}}
    reasons = {s["clip_id"]: s["reason"] for s in summary["skipped_clips"]["train"]}
    assert reasons == {"video9": "no audio stream", "video7": "no media file under --root"}
    assert [r["clip_id"] for r in read_manifest(tmp_path / "msrvtt", "retrieval")] == ["video2", "video3"]
    assert check_folder(tmp_path / "msrvtt")[1] == []  # `stella prep --check`
    assert prep_command_of(tmp_path / "msrvtt") == (f"stella prep msrvtt --list train={lists / 'MSRVTT_train.9k.csv'},"
                                                    f"test={lists / 'MSRVTT_JSFUSION_test.csv'} --root {videos} "
                                                    f"--out {tmp_path / 'msrvtt'}")
    (lists / "plain.txt").write_text("video0\nvideo1 extra\n")
    with pytest.raises(StellaError, match=r"plain.txt:2: expected one video id a line"):
        read_video_list(lists / "plain.txt")


def test_the_held_out_domain_has_new_categories_and_another_rendering():
    from dataclasses import asdict

    from stella_cli.synth import SynthConfig, class_identities
    from stella_cli.synth import HELDOUT_CONFIG, HELDOUT_TASKS, heldout_dir

    main = class_identities(SynthConfig())
    held = [i for i in class_identities(HELDOUT_CONFIG) if i.task in HELDOUT_TASKS]
    assert len(held) == 20
    assert not {(i.shape, i.colour, i.texture) for i in main} & {(i.shape, i.colour, i.texture) for i in held}
    assert not {round(i.f0, 3) for i in main} & {round(i.f0, 3) for i in held}
    changed = {k for k, v in asdict(HELDOUT_CONFIG).items() if v != asdict(SynthConfig())[k]}
    assert {"object_size", "speed", "snr_db", "event_seconds", "f0_range"} <= changed
    assert heldout_dir("data/synthetic") == Path("data/synthetic/heldout")  # beside, never inside, its files
