"""The initialisation chain's data (prep.py `--subset`, prep_init.py): the unused VGGSound clips are exactly the
complement of the task split, 'Origin' and AudioSet-20K keep every clip, and `stella prep audioset20k` writes
one folder that init_audioset20k.yaml trains on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import AS_LABELS, AS_LISTS, TINY, VGG_LABELS, VGG_STAT, fake_vggsound, make_clip, write_json

from stella_cli.cache import check_folder, prep_command_of, read_manifest, read_meta
from stella_cli.config import load_recipe
from stella_cli.data import check_prepared
from stella_cli.errors import StellaError
from stella_cli.prep import plan_real, prepare_real, resolve_lists
from stella_cli.prep_init import prepare_audioset20k

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "300"}  # one line per message
MID = {r.split(",", 2)[2].strip('"'): r.split(",")[1] for r in VGG_LABELS.read_text().splitlines()[1:]}
AS_ITEMS = [("aaa", "/m/01hsr_"), ("bbb", "/m/01hsr_,/m/09x0r"), ("ccc", "/m/05tny_,/m/0jbk"),
            ("ddd", "/m/05tny_,/m/018vs"), ("eee", "/m/09x0r"), ("fff", "/m/0k4j,/m/02mfyn")]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stella_cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def ids(clips) -> list[str]:
    return [c.clip_id for c in clips]


# ----------------------------------------------------------------------------------------------------------
# planning


def test_vggsound_unused_is_the_complement_of_the_task_split(tmp_path):
    inputs = fake_vggsound(tmp_path, n_train=5, n_test=6, n_retrieval=5)
    tasks = plan_real("vggsound", **inputs, classes_per_task=2, max_train_per_class=3)
    unused = plan_real("vggsound", **inputs, classes_per_task=2, max_train_per_class=3, subset="unused")
    # train: 14 trained classes x (5 - 3 over the cap) + 4 untrained classes x 5
    assert len(unused.clips["train"]) == 14 * 2 + 4 * 5
    assert set(ids(unused.clips["train"])).isdisjoint(ids(tasks.clips["train"]))
    assert len(unused.clips["train"]) + len(tasks.clips["train"]) == 18 * 5  # together: every train clip
    assert dict(unused.excluded["train"]) == {"used by the continual tasks": 14 * 3}
    sports = [c.clip_id for c in unused.clips["train"] if c.label == 0]
    assert sports == ["c01tr3_000003", "c01tr4_000004"]  # the clips after the first 3 in list order
    # test: the test clips of the 4 untrained classes (the authors' vgg_unused_test_cleaned_shrink8.csv)
    untrained = {c.index for c in unused.classes if not c.trained}
    assert len(untrained) == 4 and {c.label for c in unused.clips["test"]} == untrained
    assert len(unused.clips["test"]) == 4 * 6
    # retrieval: the first 5 unused test clips per class, not the task split's gallery
    assert ids(unused.clips["retrieval"]) == [i for i in ids(unused.clips["test"]) if int(i[5]) < 5]
    assert dict(unused.excluded["retrieval"]) == {"beyond the first 5 test clips of its class": 4}
    assert any("retrieval list is not used" in w for w in unused.warnings)
    assert unused.classes == tasks.classes and unused.sources["subset"] == "unused"


def test_vggsound_all_is_origin_every_class_and_clip(tmp_path):
    plan = plan_real("vggsound", **fake_vggsound(tmp_path, n_train=5, n_test=6), max_train_per_class=3,
                     subset="all")
    assert all(c.trained for c in plan.classes) and len(plan.classes) == 18
    assert {s: len(c) for s, c in plan.clips.items()} == {"train": 18 * 5, "test": 18 * 6, "retrieval": 18 * 5}
    assert {c.task for c in plan.clips["train"]} == set(plan.tasks)  # classes keep their task


def test_audioset_all_keeps_every_class_of_the_label_csv(tmp_path):
    media_dir = tmp_path / "media"
    media_dir.mkdir()
    for vid, _ in AS_ITEMS:
        (media_dir / f"{vid}_30000_40000.mp4").touch()
    lists = {s: write_json(tmp_path / f"{s}.json", AS_ITEMS) for s in ("train", "test")}
    plan = plan_real("audioset", list_file=lists, root=media_dir, labels=AS_LABELS, subset="all", allow_leaks=True)
    assert plan.tasks == ["all"] and len(plan.classes) == 17  # no category table: all classes, label csv order
    assert [(c.index, c.name) for c in plan.classes[:2]] == [(0, "Speech"), (1, "Whistling")]
    # the task split drops "bbb" (Speech has no category) and "ddd" (two categories); AudioSet-20K keeps both
    assert [(c.clip_id, c.labels) for c in plan.clips["train"]] == [
        ("aaa", [1]), ("bbb", [1, 0]), ("ccc", [4, 3]), ("ddd", [4, 6]), ("eee", [0]), ("fff", [16, 10])]
    assert len(plan.clips["retrieval"]) == 6  # derived: the first 5 test clips per (primary) class
    with pytest.raises(StellaError, match="--subset all: --labels is required"):
        plan_real("audioset", list_file=lists, root=media_dir, categories=AS_LISTS, subset="all")
    with pytest.raises(StellaError, match="--subset unused: audioset subsets are tasks, all"):
        plan_real("audioset", list_file=lists, root=media_dir, labels=AS_LABELS, subset="unused")


def test_a_list_folder_gives_audioset20k_its_20k_train_list(tmp_path):
    for name in ("audioset_2m_cleaned.json", "audioset_20k_cleaned.json", "audioset_eval_cleaned.json",
                 "class_labels_indices.csv"):
        (tmp_path / name).touch()
    lists, found = resolve_lists(tmp_path, "audioset20k")
    assert lists == {"train": tmp_path / "audioset_20k_cleaned.json", "test": tmp_path / "audioset_eval_cleaned.json"}
    assert found == {"labels": tmp_path / "class_labels_indices.csv"}
    (tmp_path / "audioset_20k_cleaned.json").unlink()
    with pytest.raises(StellaError, match="no audioset20k train/test lists here"):
        resolve_lists(tmp_path, "audioset20k")


# ----------------------------------------------------------------------------------------------------------
# one folder: AudioSet-20K + unused VGGSound


@pytest.fixture
def sources(tmp_path) -> dict:
    """Real mp4s: a VGGSound task split (1 class per task, 2 train clips per class) with clips left over, and
    AudioSet-20K lists of 3 train and 3 test clips."""
    vgg_media, as_media = tmp_path / "vgg_media", tmp_path / "as_media"
    mids = [MID[n] for n in ("basketball bounce", "skiing", "playing bass guitar", "playing piano")]
    items = {"train": [(f"v{j}tr{k}_{k:06d}", mid) for j, mid in enumerate(mids) for k in range(3)],
             "test": [(f"v{j}te{k}_{k:06d}", mid) for j, mid in enumerate(mids) for k in range(2)]}
    for seed, (vid, _) in enumerate(items["train"] + items["test"]):
        make_clip(vgg_media / f"{vid}.mp4", seed=seed % 7)
    vgg_lists = {s: write_json(tmp_path / f"vgg_{s}.json", it) for s, it in items.items()}
    vgg = tmp_path / "vggsound"
    prepare_real("vggsound", out=vgg, list_file=vgg_lists, root=vgg_media, categories=VGG_STAT, labels=VGG_LABELS,
                 classes_per_task=1, max_train_per_class=2, workers=0, progress=False, spec=TINY)
    for seed, (vid, _) in enumerate(AS_ITEMS[:6]):
        make_clip(as_media / f"{vid}_30000_40000.mp4", seed=seed)
    as_lists = {s: write_json(tmp_path / f"as_{s}.json", items) for s, items in (("train", AS_ITEMS[:3]),
                                                                                   ("test", AS_ITEMS[3:6]))}
    return {"vgg": vgg, "as_lists": as_lists, "as_media": as_media}


def test_audioset20k_folder_holds_both_sources_as_two_tasks(sources, tmp_path):
    out = tmp_path / "audioset20k"
    summary = prepare_audioset20k(out, list_file=sources["as_lists"], root=sources["as_media"], labels=AS_LABELS,
                                  vggsound=sources["vgg"], workers=0, progress=False, spec=TINY)
    # sports, sports, music, music with 1 trained class per task: 2 x (3 - 2 over the cap) + 2 x 3 untrained
    assert summary["splits"]["train"] == {"audioset20k": 3, "vggsound_unused": 2 * 1 + 2 * 3}
    assert summary["splits"]["test"] == {"audioset20k": 3, "vggsound_unused": 2 * 2}
    meta = read_meta(out)
    assert meta["dataset"] == "audioset" and meta["tasks"] == ["audioset20k", "vggsound_unused"]
    assert set(meta["sources"]) == {"audioset20k", "vggsound_unused"}
    assert len(meta["classes"]) == 17 + 18 and [c["index"] for c in meta["classes"]] == list(range(35))
    rows = read_manifest(out, "train")
    vgg_rows = [r for r in rows if r["task"] == "vggsound_unused"]
    vgg_train = {r["clip_id"] for r in read_manifest(sources["vgg"], "train")}
    assert vgg_train == {"v0tr0_000000", "v0tr1_000001", "v2tr0_000000", "v2tr1_000001"}
    assert {r["clip_id"] for r in vgg_rows}.isdisjoint(vgg_train)
    name = {c["index"]: c["name"] for c in meta["classes"]}
    assert {name[r["label"]] for r in vgg_rows} == {"basketball bounce", "skiing", "playing bass guitar",
                                                    "playing piano"}
    assert name[next(r for r in rows if r["clip_id"] == "aaa")["label"]] == "Whistling"
    assert check_folder(out)[1] == []  # `stella prep --check`; the rebuild command names the --vggsound to give
    lists = sources["as_lists"]
    assert prep_command_of(out) == (f"stella prep audioset20k --list train={lists['train']},test={lists['test']} "
                                    f"--root {sources['as_media']} --labels {AS_LABELS} --vggsound VGGSOUND_DIR "
                                    f"--out {out}")


def test_prep_audioset20k_through_the_cli(sources, tmp_path):
    out = tmp_path / "as20k"
    args = ["prep", "audioset20k", "--out", str(out), "--list",
            ",".join(f"{s}={p}" for s, p in sources["as_lists"].items()), "--root", str(sources["as_media"]),
            "--labels", str(AS_LABELS), "--workers", "0", "--quiet"]
    done = cli(*args, "--vggsound", str(sources["vgg"]))
    assert done.returncode == 0, done.stderr
    assert len(read_manifest(out, "train")) == 3 + 8 and read_meta(out)["spec"]["num_frames"] == 80
    # init_audioset20k.yaml accepts the folder as it is and trains on both tasks as one union
    recipe = load_recipe(ROOT / "recipes" / "init_audioset20k.yaml", [f"data.root={out}"])
    assert check_prepared(recipe.data)["tasks"] == ["audioset20k", "vggsound_unused"]
    # wrong ways: one line, exit 2, nothing left behind
    moved = tmp_path / "moved"  # a VGGSound folder whose recorded clips are gone
    shutil.copytree(sources["vgg"], moved)
    meta = json.loads((moved / "meta.json").read_text())
    meta["sources"]["root"] = str(tmp_path / "gone")
    (moved / "meta.json").write_text(json.dumps(meta))
    for extra, message in ((["--vggsound", str(sources["as_media"])], "no meta.json; give the folder"),
                           (["--vggsound", str(out)], "not a VGGSound task split"),
                           ([], "--vggsound DATA_DIR (the prepared VGGSound task split) is required"),
                           (["--vggsound", str(moved)], "is not found from here; run from the folder")):
        bad = tmp_path / "bad"
        result = cli(*[a if a != str(out) else str(bad) for a in args], *extra)
        assert result.returncode == 2 and message in result.stdout + result.stderr, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and not bad.exists()
    result = cli("prep", "audioset", "--out", str(tmp_path / "bad"), "--subset", "unused", "--root",
                 str(sources["as_media"]), "--list", ",".join(f"{s}={p}" for s, p in sources["as_lists"].items()),
                 "--labels", str(AS_LABELS))
    assert result.returncode == 2 and "--subset unused: audioset subsets are tasks, all" in result.stdout
    result = cli("prep", "ave", "--out", str(tmp_path / "bad"), "--subset", "all", "--root", str(tmp_path))
    assert result.returncode == 2 and "--subset is for vggsound and audioset only" in result.stdout
