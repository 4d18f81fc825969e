"""`stella prep` on the datasets' own annotation files (tests/data/real, excerpts byte for byte, README there), with
media made here, through the CLI: the forms each reader accepts, and the wrong ways, each one line, exit 2, with
nothing written."""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import cli_batch, make_clip, write_png, write_wav

from stella_cli.ave import segment_labels
from stella_cli.cache import read_manifest, read_meta
from stella_cli.prep_downstream import read_video_list

REAL = Path(__file__).parent / "data" / "real"
BOM = codecs.BOM_UTF8


def error_line(code: int, output: str) -> str:
    """The one `error:` line of a refused run (exit 2, no traceback)."""
    assert code == 2 and "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def ok(code: int, output: str) -> str:
    assert code == 0 and "Traceback" not in output, output[-3000:]
    return output


def report(out: Path) -> dict:
    return json.loads((out / "prep_report.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# AVE: Annotations.txt as released, the split files in its form


AVE_LINES = (REAL / "ave" / "Annotations.txt").read_bytes().splitlines(keepends=True)
AVE_SPLIT = {"2An2JMGMbbs": "val", "hdstykfxcbw": "val", "Hhqvvc4qu2Y": "test", "K5AE5C5FUQk": "test",
             b"Female speech, woman speaking&0qvQIuQoODo": "test", b"Mandolin&0f_iTO5t3hU": "test"}


def ave_split(line: bytes) -> str:
    """The release's split of an Annotations.txt line (its data/{train,val,test}_order.h5; README)."""
    for key, split in AVE_SPLIT.items():
        if (key.encode() if isinstance(key, str) else key) in line:
            return split
    return "train"


def write_ave_release(folder: Path, bom: bool = False, header: bool = False) -> Path:
    """AVE_Dataset/: Annotations.txt (the excerpt; with a BOM and the header line if asked) and the split files."""
    folder.mkdir(parents=True)
    head = (BOM if bom else b"") + (b"Category&VideoID&Quality&StartTime&EndTime\n" if header else b"")
    (folder / "Annotations.txt").write_bytes(head + b"".join(AVE_LINES))
    for split, name in (("train", "trainSet.txt"), ("test", "testSet.txt"), ("val", "valSet.txt")):
        lines = [line for line in AVE_LINES if ave_split(line) == split]
        (folder / name).write_bytes((BOM if bom else b"") + b"".join(lines))
    return folder


def test_ave_release_zero_length_event_two_category_videos_bom_and_re_runs(tmp_path):
    release, bom_release = write_ave_release(tmp_path / "AVE_Dataset"), write_ave_release(tmp_path / "AVE_bom",
                                                                                          bom=True, header=True)
    store = tmp_path / "shared_storage" / "AVE"  # the videos live elsewhere; --root holds a link to them
    for k, vid in enumerate(("RUhOCu3LNXM", "VWi2ENBuTbw", "-ccciEuH9FE", "0qvQIuQoODo", "Hhqvvc4qu2Y")):
        make_clip(store / f"{vid}.mp4", seed=k)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(store, root / "AVE")
    (root / "AVE" / "loop").symlink_to(root)  # a link back up the tree is walked once
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "testSet.txt").write_bytes((release / "testSet.txt").read_bytes() + AVE_LINES[0])
    (leaky / "trainSet.txt").write_bytes((release / "trainSet.txt").read_bytes() + AVE_LINES[0])  # listed twice
    changed = write_ave_release(tmp_path / "AVE_changed")
    (changed / "trainSet.txt").write_bytes(b"".join((release / "trainSet.txt").read_bytes().splitlines(True)[1:]))
    other = tmp_path / "other"
    make_clip(other / "unrelated.mp4")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "ave"
    base = ["prep", "ave", "--root", root, "--quiet", "--workers", "0"]
    runs = cli_batch(
        [*base, "--list", release, "--out", out],
        [*base, "--list", changed, "--out", out],  # a refused re-run changes nothing
        [*base, "--list", bom_release, "--out", tmp_path / "ave_bom"],
        [*base, "--list", f"train={leaky / 'trainSet.txt'},test={leaky / 'testSet.txt'}", "--out", tmp_path / "l1"],
        [*base, "--list", f"train={leaky / 'trainSet.txt'},test={leaky / 'testSet.txt'},annotations="
         f"{release / 'Annotations.txt'}", "--out", tmp_path / "l2", "--allow-leaks"],
        ["prep", "ave", "--root", tmp_path / "empty", "--list", release, "--out", tmp_path / "x1"],
        ["prep", "ave", "--root", other, "--list", release, "--out", tmp_path / "x2"],
        [*base, "--list", release / "trainSet.txt", "--out", tmp_path / "x3"],
        [*base, "--list", f"train={release / 'trainSet.txt'}", "--out", tmp_path / "x4"],
    )
    text = ok(*runs[0])
    assert "note: 3 videos are labelled with more than one category and left out" in text
    meta = read_meta(out)
    names = ["Banjo", "Church bell", "Female speech, woman speaking", "Male speech, man speaking", "Mandolin",
             "Ukulele"]
    assert [c["name"] for c in meta["classes"]] == names
    train = {r["clip_id"]: r for r in read_manifest(out, "train")}
    assert sorted(train) == ["RUhOCu3LNXM", "VWi2ENBuTbw"] and [r["clip_id"] for r in
                                                                read_manifest(out, "test")] == ["Hhqvvc4qu2Y"]
    zero = train["VWi2ENBuTbw"]  # Annotations.txt:27, 0 & 0: every segment is background, as the release's labels
    assert (zero["event_start"], zero["event_end"]) == (0.0, 0.0)
    assert segment_labels((0.0, 0.0), 10, zero["label"], len(names)).tolist() == [len(names)] * 10
    assert (train["RUhOCu3LNXM"]["event_start"], train["RUhOCu3LNXM"]["event_end"]) == (0.0, 10.0)
    rep = report(out)
    skipped = {s["clip_id"]: s["reason"] for s in rep["splits"]["train"]["skipped"]}
    assert skipped["-ccciEuH9FE"] == ("labelled with 2 categories (Male speech, man speaking; Female speech, woman "
                                      "speaking): left out, its segments would carry two labels")
    assert skipped["0f_iTO5t3hU"].startswith("labelled with 3 categories (Ukulele; Banjo; Mandolin)")
    assert "0qvQIuQoODo" in skipped and "0qvQIuQoODo" in {s["clip_id"] for s in rep["splits"]["test"]["skipped"]}
    assert skipped["MH3m4AwEcRY"] == "no media file under --root"
    assert rep["splits"]["train"]["selected"] == 26 + 3 and rep["splits"]["test"]["selected"] == 4
    assert rep["leaks"] == {}  # the release's leaks are its multi-category videos, which are left out
    assert any("1 zero-length events" in w and "VWi2ENBuTbw" in w for w in rep["warnings"])
    assert any(w.endswith("valSet.txt: 2 rows not used (the authors train on trainSet.txt and test on testSet.txt)")
               for w in rep["warnings"])
    # the refused re-run (runs[1], done before these reads) changed nothing: meta.json and the report are the first
    # run's (their sources name AVE_Dataset/, not AVE_changed/)
    assert "use a new --out folder (nothing was changed)" in error_line(*runs[1])
    assert meta["sources"]["lists"]["train"] == str(release / "trainSet.txt")
    assert not any("AVE_changed" in w for w in rep["warnings"]) and "AVE_changed" not in (out / "train.csv").read_text()
    ok(*runs[2])  # a byte-order mark and a header line: the same classes, no '\ufeffChurch bell'
    assert read_meta(tmp_path / "ave_bom")["classes"] == meta["classes"]
    assert read_manifest(tmp_path / "ave_bom", "train") == read_manifest(out, "train")
    line = error_line(*runs[3])
    assert f"1 clips are in both the train and the test split (e.g. RUhOCu3LNXM ({leaky / 'trainSet.txt'}:1))" \
        in line and "--allow-leaks" in line and not (tmp_path / "l1").exists()
    ok(*runs[4])
    rep = report(tmp_path / "l2")
    assert rep["leaks"] == {"train/test": {"count": 1, "examples": [f"RUhOCu3LNXM ({leaky / 'trainSet.txt'}:1)"]}}
    assert any(w.startswith("train: 1 clip ids listed more than once (the first is kept): RUhOCu3LNXM") for w in
               rep["warnings"])
    assert "RUhOCu3LNXM" in {r["clip_id"] for r in read_manifest(tmp_path / "l2", "test")}
    assert "no media files (.avi, .flv, .m4v, .mkv, .mov, .mp4, .webm) under it" in error_line(*runs[5])
    assert f"none of the {26 + 2} listed clips has a media file there (looked for file names like RUhOCu3LNXM, " \
           "MH3m4AwEcRY, WM5R44UMLq0; found e.g. unrelated.mp4)" in error_line(*runs[6])
    line = error_line(*runs[7])
    assert f"--list {release / 'trainSet.txt'}: not a folder; give a folder holding trainSet.txt" in line
    assert "both train= and test= are required" in error_line(*runs[8])
    assert not any((tmp_path / f"x{k}").exists() for k in range(1, 5))


def test_ave_lines_that_cannot_be_read(tmp_path):
    from stella_cli.errors import StellaError
    from stella_cli.prep_downstream import read_ave_list

    bad = tmp_path / "trainSet.txt"
    bad.write_bytes(AVE_LINES[0] + b"Church bell&abc&good&6&2\n")
    with pytest.raises(StellaError, match=r"trainSet.txt:2: event \[6, 2\) ends before it starts"):
        read_ave_list(bad)
    bad.write_bytes(codecs.BOM_UTF16_LE + "Church bell&abc&good&0&2\n".encode("utf-16-le"))
    with pytest.raises(StellaError, match="trainSet.txt: AVE annotation file is saved as UTF-16; save it as UTF-8"):
        read_ave_list(bad)
    bad.write_bytes(AVE_LINES[0] + "Cloche d'église&abc&good&0&2\n".encode("latin-1"))
    with pytest.raises(StellaError, match=r"trainSet.txt:2: AVE annotation file is not UTF-8 text \(byte 0xe9\)"):
        read_ave_list(bad)


# ----------------------------------------------------------------------------------------------------------
# VGGSound: stat.csv as released, the authors' csv lists, clips named as the VGGSound release names them


def authors_csv(rows: list[tuple[str, int, str]], mids: dict[str, str], categories: dict[str, str]) -> bytes:
    """The STELLA authors' vgg_*_cleaned.csv rows (json2csv_vggsound.py: pandas index 0, no header)."""
    out = []
    for ytid, start, label in rows:
        stem = f"{ytid}_{start * 1000}_{(start + 10) * 1000}"
        out.append(f"0,{ytid},vggsound/data/frames/{stem},vggsound/data/audio/{stem}.mp3,{mids[label]},"
                   f"{categories[label]}\n")
    return "".join(out).encode()


def test_vggsound_release_names_resolve_from_the_authors_csv(tmp_path):
    import csv

    stat = (REAL / "vggsound" / "stat.csv").read_bytes()
    categories = {r[0]: r[2] for r in csv.reader(stat.decode().splitlines())}
    mids = {name: f"/m/vgg{k:03d}" for k, name in enumerate(categories)}  # CAV-MAE's label csv is not public
    labels = "index,mid,display_name\n" + "".join(f'{k},{mids[n]},"{n}"\n' for k, n in enumerate(categories))
    clips = [(line.split(",")[0][:-4], line.split(",", 1)[1]) for line in
             (REAL / "vggsound" / "test.csv").read_text().splitlines()]
    rows = [(stem.rsplit("_", 1)[0], int(stem.rsplit("_", 1)[1]), label) for stem, label in clips]
    media = tmp_path / "vggsound" / "video"
    for k, (stem, _) in enumerate(clips[:3] + clips[10:11] + clips[19:]):  # the last starts at 0
        make_clip(media / f"{stem}.mp4", seed=k)  # the release's names: {ytid}_{start:06d}.mp4
    (tmp_path / "stat.csv").write_bytes(stat)
    (tmp_path / "labels.csv").write_text(labels)
    (tmp_path / "train.csv").write_bytes(authors_csv(rows[:10], mids, categories))
    (tmp_path / "test.csv").write_bytes(authors_csv(rows[10:], mids, categories))
    (tmp_path / "leaky_test.csv").write_bytes(authors_csv(rows[10:] + rows[:1], mids, categories))
    bom = tmp_path / "bom"
    bom.mkdir()
    for name in ("stat.csv", "labels.csv", "train.csv", "test.csv"):
        (bom / name).write_bytes(BOM + (tmp_path / name).read_bytes())
    out = tmp_path / "vgg"

    def args(folder: Path, test: str = "test.csv", labels_file: str = "labels.csv") -> list:
        return ["prep", "vggsound", "--root", tmp_path / "vggsound", "--list",
                f"train={folder / 'train.csv'},test={folder / test}", "--labels", folder / labels_file,
                "--categories", folder / "stat.csv", "--workers", "0", "--quiet"]

    runs = cli_batch([*args(tmp_path), "--out", out], [*args(bom), "--out", tmp_path / "vgg_bom"],
                     [*args(tmp_path, "leaky_test.csv"), "--out", tmp_path / "x1"],
                     [*args(tmp_path, labels_file="stat.csv"), "--out", tmp_path / "x2"])
    ok(*runs[0])
    train = read_manifest(out, "train")
    assert sorted(Path(r["source"]).name for r in train) == sorted(f"{s}.mp4" for s, _ in clips[:3])
    assert {r["clip_id"] for r in train} == {f"{y}_{s * 1000}_{(s + 10) * 1000}" for y, s, _ in rows[:3]}
    assert len(read_manifest(out, "test")) == 2 and len(report(out)["splits"]["train"]["skipped"]) == 7
    ok(*runs[1])
    assert read_meta(tmp_path / "vgg_bom")["classes"] == read_meta(out)["classes"]
    assert [r["clip_id"] for r in read_manifest(tmp_path / "vgg_bom", "train")] == [r["clip_id"] for r in train]
    assert "1 clips are in both the train and the test split (e.g. glLQrEijrKg_300000_310000)" in error_line(*runs[2])
    assert "--labels needs a label csv with a mid per class (index,mid,display_name); a name,count,category " \
           "table such as VGGSound's stat.csv goes to --categories" in error_line(*runs[3])
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x2").exists()


# ----------------------------------------------------------------------------------------------------------
# AudioSet: CAV-MAE's json and label csv as released


def test_audioset_cavmae_json_and_label_csv_with_and_without_header(tmp_path):
    items = json.loads((REAL / "audioset" / "sample_json_as.json").read_text())["data"]
    labels = (REAL / "audioset" / "class_labels_indices.csv").read_bytes()
    (tmp_path / "train.json").write_text(json.dumps({"data": items[:8]}))
    (tmp_path / "test.json").write_bytes(BOM + json.dumps({"data": items[8:]}).encode())
    (tmp_path / "headerless.csv").write_bytes(BOM + labels.split(b"\n", 1)[1])
    media = tmp_path / "AudioSet" / "video"
    make_clip(media / "--4gqARaEJE_30000_40000.mp4", seed=0)  # audiosetdl's name
    make_clip(media / "-0nqfRcnAYE.mp4", seed=1)
    make_clip(media / "-BHPu-dPmWQ.mp4", seed=2)
    lists = f"train={tmp_path / 'train.json'},test={tmp_path / 'test.json'}"
    base = ["prep", "audioset", "--subset", "all", "--root", tmp_path / "AudioSet", "--list", lists, "--workers", "0",
            "--quiet"]
    runs = cli_batch([*base, "--labels", REAL / "audioset" / "class_labels_indices.csv", "--out", tmp_path / "a"],
                     [*base, "--labels", tmp_path / "headerless.csv", "--out", tmp_path / "b"])
    ok(*runs[0])
    ok(*runs[1])
    meta = read_meta(tmp_path / "a")
    assert len(meta["classes"]) == 27 and meta["classes"][1]["name"] == "Male speech, man speaking"
    assert read_meta(tmp_path / "b")["classes"] == meta["classes"]
    train = read_manifest(tmp_path / "a", "train")
    names = {c["index"]: c["name"] for c in meta["classes"]}
    assert [(r["clip_id"], [names[i] for i in r["labels"]]) for r in train] == [
        ("--4gqARaEJE", ["Domestic animals, pets", "Squeak", "Dog", "Animal"]),
        ("-0nqfRcnAYE", ["Dishes, pots, and pans"])]
    assert [r["clip_id"] for r in read_manifest(tmp_path / "b", "test")] == ["-BHPu-dPmWQ"]


# ----------------------------------------------------------------------------------------------------------
# MSR-VTT: the authors' lists, and a ';'-separated CRLF copy of the JSFusion test csv


def test_msrvtt_lists_as_released(tmp_path):
    lists = tmp_path / "structured-symlinks"
    lists.mkdir()
    for name in ("train_list_miech.txt", "test_list_miech.txt", "MSRVTT_JSFUSION_test.csv"):
        (lists / name).write_bytes((REAL / "msrvtt" / name).read_bytes())
    jsfusion = lists / "MSRVTT_JSFUSION_test.csv"
    comma = tmp_path / "comma_bom.csv"
    comma.write_bytes(BOM + jsfusion.read_bytes().replace(b";", b","))
    ids = [v for v, _ in read_video_list(jsfusion)]
    assert ids[:3] == ["video9770", "video9771", "video7020"] and len(ids) == 20
    assert [v for v, _ in read_video_list(comma)] == ids
    assert read_video_list(lists / "test_list_miech.txt")[0] == ("video8782", f"{lists / 'test_list_miech.txt'}:1")
    videos = tmp_path / "MSRVTT" / "videos" / "all"
    for k, vid in enumerate(("video0", "video1", "video10", "video8782", "video8783", "video9770", "video7020")):
        make_clip(videos / f"{vid}.mp4", seed=k)
    make_clip(videos / "video1000.mp4", audio=False)  # MSR-VTT has videos without sound
    base = ["prep", "msrvtt", "--root", tmp_path / "MSRVTT", "--workers", "0", "--quiet"]
    mixed = f"train={lists / 'train_list_miech.txt'},test={jsfusion}"
    runs = cli_batch([*base, "--list", lists, "--out", tmp_path / "m"],
                     [*base, "--list", mixed, "--out", tmp_path / "x1"],
                     [*base, "--list", mixed, "--out", tmp_path / "m2", "--allow-leaks"],
                     [*base, "--list", tmp_path, "--out", tmp_path / "x2"])
    ok(*runs[0])  # the folder's authors' pair (train_list_miech + test_list_miech)
    assert [r["clip_id"] for r in read_manifest(tmp_path / "m", "train")] == ["video0", "video1", "video10",
                                                                             "video7020"]
    assert [r["clip_id"] for r in read_manifest(tmp_path / "m", "retrieval")] == ["video8782", "video8783"]
    skipped = {s["clip_id"]: s["reason"] for s in report(tmp_path / "m")["splits"]["train"]["skipped"]}
    assert skipped["video1000"] == "no audio stream" and len(skipped) == 27 - 4
    line = error_line(*runs[1])  # 5 of the excerpt's JSFusion test videos are in the miech train list
    assert "5 clips are in both the train and the retrieval split (e.g. video7020 " in line
    ok(*runs[2])
    assert report(tmp_path / "m2")["leaks"]["train/retrieval"]["count"] == 5
    assert [r["clip_id"] for r in read_manifest(tmp_path / "m2", "retrieval")] == ["video9770", "video7020"]
    assert "no MSR-VTT train/test lists here; give --list train=FILE,test=FILE or a folder holding one of the " \
           "pairs train_list_miech.txt + test_list_miech.txt" in error_line(*runs[3])
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x2").exists()


# ----------------------------------------------------------------------------------------------------------
# AVSBench S4: the processed release (visual_frames + audio_wav), a raw video, and --masks checked


def test_avsbench_processed_release_raw_video_and_mask_checks(tmp_path):
    s4 = tmp_path / "Single-source" / "s4_data"
    rng = np.random.default_rng(0)
    mask = np.zeros((24, 32), np.uint8)
    mask[:12, 4:20] = 255
    rows = [("clipA", "dog_barking", "train"), ("clipB", "helicopter", "train"), ("clipC", "dog_barking", "test"),
            ("clipD", "helicopter", "val")]
    for k, (name, category, split) in enumerate(rows):
        for j in range(1, 6 if split == "test" else 2):  # S4 annotates frame 1 of a train video, all 5 of a test one
            write_png(s4 / "gt_masks" / split / category / name / f"{name}_{j}.png", mask)
        if name == "clipB":  # as a raw video only
            make_clip(s4 / "raw_videos" / split / category / f"{name}.mp4", seconds=5.0, seed=k)
            continue
        for j in range(1, 6):  # 5 frames at 1 fps, as AVSBench's preprocess_s4.py writes them
            write_png(s4 / "visual_frames" / split / category / name / f"{name}_{j}.png",
                      rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        write_wav(s4 / "audio_wav" / split / category / f"{name}.wav", seconds=5.0, seed=k)
    meta_csv = tmp_path / "Single-source" / "s4_meta_data.csv"  # AVSBench's loader: name col 0, category col 2
    meta_csv.write_bytes(BOM + b"name,start_time,category,split\r\n" + b"".join(
        f"{n},0,{c},{s}\r\n".encode() for n, c, s in rows))
    leaky = tmp_path / "leaky.csv"
    leaky.write_text("vid,start_time,category,split\nclipA,0,dog_barking,train\nclipA,0,dog_barking,test\n")
    base = ["prep", "avs", "--root", s4, "--list", meta_csv, "--workers", "0", "--quiet"]
    runs = cli_batch([*base, "--out", tmp_path / "avs"],
                     [*base, "--masks", s4.parent, "--out", tmp_path / "x1"],
                     [*base, "--masks", s4 / "visual_frames", "--out", tmp_path / "x2"],
                     ["prep", "avs", "--root", s4, "--list", leaky, "--out", tmp_path / "x3"])
    ok(*runs[0])
    out = tmp_path / "avs"
    assert [r["clip_id"] for r in read_manifest(out, "train")] == ["clipA", "clipB"]
    assert [r["clip_id"] for r in read_manifest(out, "test")] == ["clipC"]
    assert any("1 val rows not used" in w for w in report(out)["warnings"])
    frames = np.load(out / "cache" / "train" / "frames.npy", mmap_mode="r")
    assert frames.shape == (2, 40, 256, 256, 3)  # 40 frames over 5 s: each 1 fps image 8 times
    assert np.array_equal(frames[0, 0], frames[0, 7]) and not np.array_equal(frames[0, 7], frames[0, 8])
    masks = np.load(out / "cache" / "train" / "masks.npy")  # (clips, annotated frames, S, S)
    assert masks.shape == (2, 1, 256, 256) and masks[0].sum() > 0 and np.array_equal(masks[0], masks[1])
    test_masks = np.load(out / "cache" / "test" / "masks.npy")
    assert test_masks.shape == (1, 5, 256, 256) and all(np.array_equal(m, masks[0, 0]) for m in test_masks[0])
    assert "two masks named clipA_1.png" in error_line(*runs[1])
    line = error_line(*runs[2])
    assert "clipA_1.png: not a mask (" in line and "--masks must be AVSBench's gt_masks folder" in line
    assert "1 clips are in both the train and the test split (e.g. clipA" in error_line(*runs[3])
    assert not any((tmp_path / f"x{k}").exists() for k in range(1, 4))
