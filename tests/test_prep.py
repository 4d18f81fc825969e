"""`stella prep vggsound|audioset` (prep.py): task split rules, input errors, the skipped-clip report, resume,
and parallel workers writing the same cache as one process."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import AS_LABELS, AS_LISTS, TINY, VGG_LABELS, VGG_MIDS, VGG_STAT, fake_vggsound, make_clip, write_json

from stella_cli import media, prep
from stella_cli.audio import clip_fbank
from stella_cli.cache import DONE, PENDING, SplitReader, check_folder, prep_command_of, read_manifest, read_meta
from stella_cli.errors import StellaError
from stella_cli.prep import plan_real, prepare_real


# ----------------------------------------------------------------------------------------------------------
# task split


def test_vggsound_split_first_classes_cap_and_retrieval(tmp_path):
    plan = plan_real("vggsound", **fake_vggsound(tmp_path), classes_per_task=2, max_train_per_class=3)
    names = [c.name for c in plan.classes]
    trained = ["basketball bounce", "playing squash", "playing bass guitar", "playing piano", "helicopter",
               "race car, auto racing", "baby laughter", "dog barking", "hail", "thunder", "cap gun shooting",
               "hammering nails", "foghorn", "popping popcorn"]  # first 2 per task, label csv order, task order
    assert names == trained + ["skiing", "toilet flushing", "slot machine", "ripping paper"]
    assert [c.index for c in plan.classes] == list(range(18))
    by_name = {c.name: c for c in plan.classes}
    assert (by_name["toilet flushing"].category, by_name["toilet flushing"].task) == ("home", "home_nature")
    assert by_name["slot machine"].task == by_name["hammering nails"].task == "others_part1"
    assert by_name["ripping paper"].task == "others_part2" and not by_name["ripping paper"].trained
    sizes = {s: len(c) for s, c in plan.clips.items()}
    assert sizes == {"train": 14 * 3, "test": 14 * 6, "retrieval": 18 * 5}
    assert dict(plan.excluded["train"]) == {"over the 3-clip cap of its class": 14 * 2,
                                           "class not trained (beyond the first classes of its task)": 4 * 5}
    sports = [c.clip_id for c in plan.clips["train"] if c.label == 0]
    assert sports == ["c01tr0_000000", "c01tr1_000001", "c01tr2_000002"]  # the first 3 in list order
    per_task = {t: sum(c.task == t for c in plan.clips["train"]) for t in plan.tasks}
    assert per_task == {"sports": 6, "music": 6, "vehicle": 6, "people": 3, "animals": 3, "home_nature": 6,
                        "others_part1": 6, "others_part2": 6}
    only_trained = plan_real("vggsound", **fake_vggsound(tmp_path / "b"), classes_per_task=2,
                             max_train_per_class=3, retrieval_all_classes=False)
    assert len(only_trained.clips["retrieval"]) == 14 * 5


def test_vggsound_paper_rules_missing_media_and_derived_retrieval(tmp_path):
    inputs = fake_vggsound(tmp_path, n_train=5, n_test=7, n_retrieval=None)
    (inputs["root"] / "c00tr0_000000.mp4").unlink()
    inputs["list_file"] = [f"{s}={p}" for s, p in inputs["list_file"].items()]  # a repeated --list SPLIT=FILE
    plan = plan_real("vggsound", **inputs)  # 20 classes per task, 400 per class: everything is trained
    assert {s: len(c) for s, c in plan.clips.items()} == {"train": 18 * 5 - 1, "test": 18 * 7, "retrieval": 18 * 5}
    assert plan.missing["train"] == [{"clip_id": "c00tr0_000000", "source": f"{tmp_path / 'train.json'}: data[0]",
                                      "reason": "no media file under --root"}]
    assert any("first 5 test clips per class" in w for w in plan.warnings)
    retrieval = [c.clip_id for c in plan.clips["retrieval"] if c.label == plan.clips["test"][0].label]
    assert retrieval == [f"c00te{k}_{k:06d}" for k in range(5)]


def test_audioset_single_category_rule(tmp_path):
    media_dir = tmp_path / "media"
    media_dir.mkdir()
    items = [("aaa", "/m/01hsr_"), ("bbb", "/m/01hsr_,/m/09x0r"), ("ccc", "/m/05tny_,/m/0jbk"),
             ("ddd", "/m/05tny_,/m/018vs"), ("eee", "/m/09x0r"), ("fff", "/m/0k4j,/m/02mfyn"),
             ("ggg", "/m/03l9g,/m/07pp_mv")]
    for vid, _ in items:  # audiosetdl names the files {ytid}_{start ms}_{end ms}
        (media_dir / f"{vid}_30000_40000.mp4").touch()
    lists = {s: write_json(tmp_path / f"{s}.json", items) for s in ("train", "test", "retrieval")}
    plan = plan_real("audioset", list_file=lists, root=media_dir, categories=AS_LISTS, labels=AS_LABELS,
                     allow_leaks=True)  # one list for all three splits: kept, and counted
    assert {k: v["count"] for k, v in plan.leaks.items()} == {"train/test": 5, "train/retrieval": 5}
    assert [(c.name, c.task) for c in plan.classes] == [
        ("Whistling", "human"), ("Chuckle, chortle", "human"), ("Vehicle", "vehicle"), ("Car alarm", "vehicle"),
        ("Thunder", "nature"), ("Animal", "animal"), ("Bark", "animal"), ("Meow", "animal"), ("Clock", "others"),
        ("Hammer", "others"), ("Alarm", "others"), ("Doorbell", "home"), ("Banjo", "music"), ("Harp", "music"),
        ("Musical instrument", "music")]
    clips = plan.clips["train"]
    assert [(c.clip_id, c.task, c.labels) for c in clips] == [
        ("aaa", "human", [0]), ("bbb", "human", [0]), ("ccc", "animal", [6, 5]), ("fff", "vehicle", [3]),
        ("ggg", "others", [9, 10])]
    assert clips[0].source == str(media_dir / "aaa_30000_40000.mp4")
    assert dict(plan.excluded["train"]) == {"labels in more than one category": 1,
                                           "no label in the category table": 1}
    assert any("Engine" in w and "Tools" in w for w in plan.warnings)  # group names absent from the label csv


def test_duplicates_are_reported_and_leaks_refused(tmp_path):
    inputs = fake_vggsound(tmp_path, n_train=2, n_test=2, n_retrieval=None)
    train = write_json(tmp_path / "train2.json", [("c00tr0_000000", VGG_MIDS[0]), ("c01tr1_000001", VGG_MIDS[1]),
                                                 ("c00tr0_000000", VGG_MIDS[0])])
    plan = plan_real("vggsound", **(inputs | {"list_file": {"train": train, "test": inputs["list_file"]["test"]}}))
    assert [c.clip_id for c in plan.clips["train"]] == ["c00tr0_000000", "c01tr1_000001"]
    assert f"train: 1 clip ids listed more than once (the first is kept): c00tr0_000000 ({train}: data[0], again " \
           f"at {train}: data[2])" in plan.warnings
    assert dict(plan.excluded["train"]) == {"duplicate clip id": 1} and plan.leaks == {}
    test = write_json(tmp_path / "test2.json", [("c01te0_000000", VGG_MIDS[1]), ("c01tr1_000001", VGG_MIDS[1])])
    lists = {"train": train, "test": test}
    with pytest.raises(StellaError, match=r"^1 clips are in both the train and the test split \(e.g. c01tr1_000001\)"):
        plan_real("vggsound", **(inputs | {"list_file": lists}))
    kept = plan_real("vggsound", **(inputs | {"list_file": lists}), allow_leaks=True)
    assert kept.leaks == {"train/test": {"count": 1, "examples": ["c01tr1_000001"]},
                          "train/retrieval": {"count": 1, "examples": ["c01tr1_000001"]}}


def test_stella_csv_lists(tmp_path):
    media_dir = tmp_path / "media"
    media_dir.mkdir()
    rows = [(0, "vidA", "vggsound/data/frames/vidA_30000_40000", "vggsound/data/audio/vidA_30000_40000.mp3",
             VGG_MIDS[1], "sports"),
            (1, "vidB", "vggsound/data/frames/vidB_0_10000", "vggsound/data/audio/vidB_0_10000.mp3",
             VGG_MIDS[9], "music")]
    for r in rows:
        (media_dir / f"{Path(r[2]).name}.mp4").touch()
    text = "".join(f'{i},{v},{f},{w},"{lab}",{cat}\n' for i, v, f, w, lab, cat in rows)
    for split in ("train", "test", "retrieval"):
        (tmp_path / f"{split}.csv").write_text(text)
    lists = ",".join(f"{s}={tmp_path / s}.csv" for s in ("train", "test", "retrieval"))  # SPLIT=FILE,... form
    plan = plan_real("vggsound", list_file=lists, root=media_dir, categories=VGG_STAT, labels=VGG_LABELS,
                     allow_leaks=True)
    assert [(c.clip_id, c.task, Path(c.source).name) for c in plan.clips["train"]] == [
        ("vidA_30000_40000", "sports", "vidA_30000_40000.mp4"), ("vidB_0_10000", "music", "vidB_0_10000.mp4")]


def test_list_folder_with_the_usual_file_names(tmp_path):
    inputs = fake_vggsound(tmp_path)
    for split, name in (("train", "vgg_train_cleaned.json"), ("test", "vgg_test_cleaned.json"),
                        ("retrieval", "vgg_test_5_per_class_for_retrieval_cleaned.json")):
        inputs["list_file"][split].rename(tmp_path / name)
    (tmp_path / "stat.csv").write_text(VGG_STAT.read_text())
    (tmp_path / "class_labels_indices_vgg.csv").write_text(VGG_LABELS.read_text())
    plan = plan_real("vggsound", list_file=tmp_path, root=inputs["root"])  # labels and categories found too
    assert {s: len(c) for s, c in plan.clips.items()} == {"train": 90, "test": 108, "retrieval": 90}
    assert plan.sources["categories"] == str(tmp_path / "stat.csv")


# ----------------------------------------------------------------------------------------------------------
# bad input: errors name the file and the line


def test_input_errors_name_file_and_line(tmp_path):
    inputs = fake_vggsound(tmp_path)
    with pytest.raises(StellaError, match="--categories is required"):
        plan_real("vggsound", **(inputs | {"categories": None}))
    with pytest.raises(StellaError, match="nowhere.csv"):
        plan_real("vggsound", **(inputs | {"categories": tmp_path / "nowhere.csv"}))
    bad = tmp_path / "stat_bad.csv"
    bad.write_text("dog barking,767,animals\nplaying piano,1050,music\nthunder;325;nature\n")
    with pytest.raises(StellaError, match=rf"{re.escape(str(bad))}:3: expected a label csv .* VGGSound's stat.csv"):
        plan_real("vggsound", **(inputs | {"categories": bad}))
    bad.write_text("dog barking,767,animals\nplaying piano,1050,spaceships\n")
    with pytest.raises(StellaError, match=rf"{re.escape(str(bad))}:2: unknown category 'spaceships'"):
        plan_real("vggsound", **(inputs | {"categories": bad}))
    labels = tmp_path / "labels.csv"
    labels.write_text(VGG_LABELS.read_text() + "18,/m/vgg_18,mystery sound\n")
    with pytest.raises(StellaError, match=rf"{re.escape(str(labels))}:20: class 'mystery sound' has no category"):
        plan_real("vggsound", **(inputs | {"labels": labels}))
    unknown = write_json(tmp_path / "unknown.json", [("x_000001", VGG_MIDS[0]), ("y_000001", "/m/nope")])
    with pytest.raises(StellaError, match=r"unknown.json: data\[1\]: unknown class '/m/nope'"):
        plan_real("vggsound", **(inputs | {"list_file": {"train": unknown, "test": unknown}}))
    short = tmp_path / "short.csv"
    short.write_text(f'0,vid,frames/vid,audio/vid.mp3,"{VGG_MIDS[0]}",sports\n1,vid2,frames/vid2,"{VGG_MIDS[0]}"\n')
    with pytest.raises(StellaError, match=rf"{re.escape(str(short))}:2: expected 6 columns"):
        plan_real("vggsound", **(inputs | {"list_file": {"train": short, "test": short}}))
    with pytest.raises(StellaError, match="SPLIT=FILE"):
        plan_real("vggsound", **(inputs | {"list_file": inputs["list_file"]["train"]}))
    with pytest.raises(StellaError, match="--root"):
        plan_real("vggsound", **(inputs | {"root": tmp_path / "absent"}))
    not_lists = tmp_path / "not_lists.py"
    not_lists.write_text("x = 1\n")
    with pytest.raises(StellaError, match=rf"{re.escape(str(not_lists))}: expected the dicts category_info"):
        plan_real("audioset", **(inputs | {"categories": not_lists}))


def test_unknown_folder_class(tmp_path):
    (tmp_path / "train" / "dog_barking").mkdir(parents=True)
    (tmp_path / "train" / "dog_barking" / "a.mp4").touch()
    (tmp_path / "train" / "kazoo solo").mkdir()
    (tmp_path / "train" / "kazoo solo" / "b.mp4").touch()
    with pytest.raises(StellaError, match=r"kazoo solo/b.mp4: unknown class 'kazoo solo'"):
        plan_real("vggsound", root=tmp_path, categories=VGG_STAT)


# ----------------------------------------------------------------------------------------------------------
# decoding: report, resume, workers


@pytest.fixture
def clip_folder(tmp_path) -> Path:
    """ROOT/{train,test}/CLASS/*.mp4: 3 + 2 good clips per class, and 4 unusable ones in train/dog_barking."""
    root = tmp_path / "clips"
    for j, cls in enumerate(("dog_barking", "playing piano")):
        for k in range(3):
            make_clip(root / "train" / cls / f"{cls[:3]}{k}.mp4", seed=3 * j + k)
        for k in range(2):
            make_clip(root / "test" / cls / f"{cls[:3]}_test{k}.mp4", seed=10 + 2 * j + k)
    bad = root / "train" / "dog_barking"
    good = (bad / "dog0.mp4").read_bytes()
    (bad / "x_truncated.mp4").write_bytes(good[: len(good) // 2])
    (bad / "x_noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    make_clip(bad / "x_video_only.mp4", audio=False)
    make_clip(bad / "x_short.mp4", seconds=0.25)
    return root


def run_prep(root: Path, out: Path, workers: int = 1) -> dict:
    return prepare_real("vggsound", out=out, root=root, categories=VGG_STAT, workers=workers, frames_format="raw",
                        progress=False, spec=TINY)


def test_unusable_clips_are_reported_and_left_out(clip_folder, tmp_path):
    out = tmp_path / "data"
    summary = run_prep(clip_folder, out)
    assert summary["splits"]["train"] == {"sports": 0, "music": 3, "vehicle": 0, "people": 0, "animals": 3,
                                          "home_nature": 0, "others_part1": 0, "others_part2": 0}
    assert summary["skipped"] == {"train": 4, "test": 0, "retrieval": 0}
    assert sum(summary["splits"]["test"].values()) == 4 and sum(summary["splits"]["retrieval"].values()) == 4
    report = json.loads((out / "prep_report.json").read_text())
    reasons = {s["clip_id"]: s["reason"] for s in report["splits"]["train"]["skipped"]}
    assert set(reasons) == {"x_truncated", "x_noise", "x_video_only", "x_short"}
    assert reasons["x_truncated"].startswith("cannot open") and reasons["x_noise"].startswith("cannot open")
    assert reasons["x_video_only"] == "no audio stream"
    assert reasons["x_short"] == "too short: video 0.25 s (minimum 1 s)"
    assert report["splits"]["train"]["selected"] == 10 and report["splits"]["train"]["prepared"] == 6
    assert summary["skipped_clips"]["train"] == report["splits"]["train"]["skipped"]
    manifest = read_manifest(out, "train")
    assert sorted(m["clip_id"] for m in manifest) == ["dog0", "dog1", "dog2", "pla0", "pla1", "pla2"]
    assert all(m["duration"] == 2.0 and m["task"] in ("animals", "music") for m in manifest)
    meta = read_meta(out)
    assert meta["tasks"] == prep.VGGSOUND_TASKS and len(meta["classes"]) == 18 and meta["spec"]["frame_size"] == 16
    dog = next(c for c in meta["classes"] if c["name"] == "dog barking")
    assert all(m["label"] == dog["index"] and m["category"] == "animals" for m in manifest if m["clip_id"][:3] == "dog")
    # a cached row holds exactly what decoding its source gives
    row = manifest[0]
    clip = media.decode_clip(row["source"], num_frames=8, frame_size=16, clip_seconds=2.0)
    frames = np.load(out / "cache" / "train" / "frames.npy", mmap_mode="r")[row["row"]]
    fbank = np.load(out / "cache" / "train" / "fbank.npy", mmap_mode="r")[row["row"]]
    assert np.array_equal(frames, clip.frames)
    np.testing.assert_allclose(fbank, clip_fbank(clip.waveform, 16000, 192, 64), atol=0.02)
    table, problems = check_folder(out)  # `stella prep --check`: 10 listed train clips, 6 done, 4 failed
    assert problems == [] and table[0][:6] == ["train", "6", "10", "6", "4", "0"]
    assert prep_command_of(out) == f"stella prep vggsound --root {clip_folder} --categories {VGG_STAT} --out {out}"


def cache_files(out: Path) -> dict[str, bytes]:
    names = ["frames.npy", "fbank.npy", "status.npy", "duration.npy"]
    files = {f"{s}.csv": (out / f"{s}.csv").read_bytes() for s in prep.SPLITS}
    files |= {f"{s}/{n}": (out / "cache" / s / n).read_bytes() for s in prep.SPLITS for n in names}
    return files | {n: (out / n).read_bytes() for n in ("prep_report.json", "meta.json")}


def test_resume_decodes_only_pending_and_failed_rows(clip_folder, tmp_path, monkeypatch):
    clean, out = tmp_path / "clean", tmp_path / "resumed"
    run_prep(clip_folder, clean)
    decoded: list[str] = []
    real_decode = media.decode_clip

    def counting_decode(path, **kw):
        decoded.append(Path(path).stem)
        if len(decoded) == 4:
            raise RuntimeError("interrupted")  # the 4th clip crashes the run
        return real_decode(path, **kw)

    monkeypatch.setattr(media, "decode_clip", counting_decode)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_prep(clip_folder, out)
    done_before = list(decoded[:3])
    status = np.load(out / "cache" / "train" / "status.npy")
    assert int((status == DONE).sum()) == 3  # the 3 rows finished before the crash were kept
    decoded.clear()
    monkeypatch.setattr(media, "decode_clip", lambda path, **kw: (decoded.append(Path(path).stem),
                                                                  real_decode(path, **kw))[1])
    run_prep(clip_folder, out)
    assert len(decoded) == 10 + 4 + 4 - 3 and not set(decoded) & {s for s in done_before if s[:2] != "x_"}
    assert cache_files(out) == cache_files(clean)
    # mark two good rows pending again: only they and the 4 failed rows are decoded on the next run
    status = np.load(out / "cache" / "train" / "status.npy", mmap_mode="r+")
    manifest = read_manifest(out, "train")
    for m in manifest[1:3]:
        status[m["row"]] = PENDING
    status.flush()
    del status
    decoded.clear()
    run_prep(clip_folder, out)
    assert sorted(decoded) == sorted([m["clip_id"] for m in manifest[1:3]] +
                                     ["x_truncated", "x_noise", "x_video_only", "x_short"])
    assert cache_files(out) == cache_files(clean)


def test_two_workers_write_the_same_cache(clip_folder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_prep(clip_folder, one, workers=1)
    summary = run_prep(clip_folder, two, workers=2)
    assert summary["skipped"]["train"] == 4
    a, b = cache_files(one), cache_files(two)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_a_changed_clip_list_is_refused(clip_folder, tmp_path):
    out = tmp_path / "data"
    run_prep(clip_folder, out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    (clip_folder / "test" / "dog_barking" / "dog_test0.mp4").unlink()
    with pytest.raises(StellaError, match="rows.json: the cache was prepared from another clip list"):
        run_prep(clip_folder, out)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # nothing was written


def test_prepare_split_directly(tmp_path):
    """The synthetic benchmark's --format mp4 calls prepare_split with its own ClipSource list."""
    clips = [prep.ClipSource(f"s{i}", str(make_clip(tmp_path / f"s{i}.mp4", seed=i)), i % 2, [i % 2], "c",
                             f"t{i % 2}", event_start=0.5 * i, event_end=1.5) for i in range(3)]
    res = prep.prepare_split(tmp_path / "out", "train", clips, TINY, workers=1, progress=False)
    assert res == {"clips": {"t0": 2, "t1": 1}, "skipped": [], "decoded": 3}
    rows = read_manifest(tmp_path / "out", "train")
    assert [(r["event_start"], r["event_end"]) for r in rows] == [(0.0, 1.5), (0.5, 1.5), (1.0, 1.5)]
    again = prep.prepare_split(tmp_path / "out", "train", clips, TINY, workers=1, progress=False)
    assert again["decoded"] == 0 and again["clips"] == {"t0": 2, "t1": 1}
    jpeg = dataclasses.replace(TINY, frames_format="jpeg")
    prep.prepare_split(tmp_path / "jpeg", "train", clips, jpeg, workers=1, progress=False)
    raw, small = SplitReader(tmp_path / "out", "train", TINY), SplitReader(tmp_path / "jpeg", "train", jpeg)
    for row in range(3):
        assert np.abs(raw.frames(row, range(8)).astype(int) - small.frames(row, range(8))).mean() < 4
        assert np.array_equal(raw.fbank(row), small.fbank(row))
