"""`stella prep ave` on made-up annotation files and real mp4s, and the AVE segments read back from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_clip

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
    fbank = np.load(out / "cache" / "train" / "fbank.npy", mmap_mode="r")[train["vid_bell"]["row"]].astype(np.float32)
    expected = (pad_segment(fbank[100:200], 192) + 5.081) / 4.4849
    np.testing.assert_allclose(item["audio"][1, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.allclose(item["audio"][1, 0, :50].numpy(), 5.081 / 4.4849)  # 92 rows padded by 50 zeros before
    assert check_folder(out)[1] == []  # `stella prep --check`
    assert prep_command_of(out) == f"stella prep ave --list {tmp_path / 'ann'} --root {videos} --out {out}"


def test_ave_list_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "trainSet.txt"
    bad.write_text("Dog&vid&good&0&1\nDog&vid2&good&zero&1\n")
    with pytest.raises(StellaError, match=r"trainSet.txt:2: start and end must be seconds"):
        read_ave_list(bad)
    bad.write_text("Dog,vid,good,0,1\n")
    with pytest.raises(StellaError, match=r"trainSet.txt:1: expected category&video_id&quality&start&end"):
        read_ave_list(bad)
    result = subprocess.run([sys.executable, "-m", "stella_cli", "prep", "ave", "--root", str(tmp_path), "--out",
                             str(tmp_path / "o")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "trainSet.txt:1: expected" in "".join(result.stdout.split("\n"))
    assert "Traceback" not in result.stdout + result.stderr


def write_png(path: Path, gray: np.ndarray) -> Path:
    """A real grayscale png through PyAV's png encoder."""
    import av

    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = gray.shape[1], gray.shape[0], "gray"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(gray), format="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None)))
    return path


def test_mask_iou_and_f_score_on_known_masks():
    from stella_cli.avs import box_mask, f_score, mask_iou

    target = torch.zeros(3, 4, 4)
    target[0, :2, :2] = 1  # 4 pixels
    target[1, 0, 0] = 1
    pred = torch.zeros(3, 4, 4)
    pred[0, :2, :3] = 1  # 6 predicted, 4 hit: IoU 4/6
    # frame 1: nothing predicted: IoU 0; frame 2: both empty: IoU 1
    assert mask_iou(pred, target).tolist() == pytest.approx([4 / 6, 0.0, 1.0])
    # F at beta² 0.3 with hard probabilities: frame 0 P = 4/6, R = 1; frame 1: P = R = 0 -> 0; frame 2: 0
    p, r = 4 / 6, 1.0
    assert f_score(pred, target) == pytest.approx(((1.3 * p * r) / (0.3 * p + r)) / 3)
    # a graded prediction: the best threshold keeps only the true pixels
    soft = target * 0.9 + (pred - target).clamp(min=0) * 0.4
    assert f_score(soft[:1], target[:1]) == pytest.approx(1.0)
    assert box_mask(np.array([0.25, 0.0, 0.5, 0.5]), 4).tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0],
                                                                    [0, 0, 0, 0]]


def test_prep_avs_reads_the_s4_csv_mask_pngs_and_real_mp4s(tmp_path):
    from stella_cli.avs import MaskDataset
    from stella_cli.prep_downstream import prepare_avs

    videos, masks = tmp_path / "videos", tmp_path / "gt_masks"
    (tmp_path / "s4_meta_data.csv").write_text("name,category,split\nclipA,dog,train\nclipB,cat,train\n"
                                               "clipC,dog,test\nclipD,cat,train\nclipE,dog,val\n")
    for k, name in enumerate(("clipA", "clipB", "clipC", "clipD")):
        make_clip(videos / f"{name}.mp4", seconds=2.0, fps=8, seed=k)  # 32 x 24 frames
    mask = np.zeros((24, 32), np.uint8)
    mask[:12, 4:20] = 255  # top-left region of a 32 x 24 frame
    for name, split, cat in (("clipA", "train", "dog"), ("clipB", "train", "cat"), ("clipC", "test", "dog")):
        write_png(masks / split / cat / name / f"{name}_1.png", mask)  # clipD has no mask
    out = tmp_path / "avs_data"
    summary = prepare_avs(out, root=videos, meta_csv=tmp_path / "s4_meta_data.csv", masks=masks, workers=1,
                          progress=False, spec=TINY)
    assert summary["splits"] == {"train": {"avs": 2}, "test": {"avs": 1}}
    assert summary["skipped_clips"]["train"][0]["reason"] == "no mask png under --masks"
    cached = np.load(out / "cache" / "train" / "masks.npy")
    assert cached.shape == (2, 16, 16)
    # 32 x 24 -> short side 16: 21 x 16, centre crop from x = 2; the mask (x 4..20 of 32, y 0..12 of 24)
    # becomes x 2.6..13.1 -> cropped columns 1..10, rows 0..7
    expected = np.zeros((16, 16), np.uint8)
    expected[:8, 1:11] = 1
    assert np.abs(cached[0].astype(int) - expected).sum() <= 4  # bilinear edges
    data = DataConfig(dataset="avs", root=str(out), image_size=16, num_frames=2, frame_stride=1, target_length=192,
                      num_mel_bins=64, num_workers=0)
    item = MaskDataset(data, "train", seed=0)[0]
    assert item["mask"].shape == (16, 16) and torch.equal(item["mask"], torch.from_numpy(cached[0]).float())
    assert item["video"].shape == (2, 3, 16, 16) and item["audio"].shape == (1, 192, 64)
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
                                                    f"retrieval={lists / 'MSRVTT_JSFUSION_test.csv'} --root {videos} "
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
