"""The initialisation chain (method.md §1.9, §2.5): convert mae for a recipe, AVM pre-training on a frozen backbone,
loading `stella train` checkpoints as model.checkpoint / model.avm.checkpoint, and the whole chain end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from typer.testing import CliRunner

from helpers import RANDOM_START, fake_mae_state_dict, retrieval_rows

from stella_cli.cli import app
from stella_cli.config import AVMConfig, MethodConfig, ModelConfig, OptimConfig, load_recipe, resolve_model_preset
from stella_cli.checkpoint import convert_mae_for_recipe, load_authors_checkpoint, load_avm_checkpoint
from stella_cli.errors import CheckpointError, StellaError
from stella_cli.factory import METHODS, build_method, check_initial_checkpoint
from stella_cli.model import AVM, CAVMAE
from stella_cli.reproduce import SYNTHETIC_INIT, chain_jobs, chain_key, run_parallel
from stella_cli.stella import AVMPretrain
from stella_cli.train import TrainingInterrupted, build_optimizer, run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "300"}  # one line per message


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stella_cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=120, cwd=cwd)


# ----------------------------------------------------------------------------------------------------------
# stella convert mae for a recipe


def test_convert_mae_takes_the_input_sizes_from_the_recipe_and_loads_strictly(tmp_path):
    """recipes/synthetic.yaml: tiny model, 4 frames of 64x64, 384 fbank frames x 128 mel bins, 1 modality layer."""
    torch.save({"model": fake_mae_state_dict()}, tmp_path / "mae.pth")  # tiny ViT: 64-d, 2 blocks, 64x64 images
    result = runner.invoke(app, ["convert", "mae", str(tmp_path / "mae.pth"), str(tmp_path / "cav.pth"),
                                 "--recipe", str(RECIPES / "synthetic.yaml")])
    assert result.exit_code == 0, result.output
    assert "fits" in result.output
    sd = torch.load(tmp_path / "cav.pth", map_location="cpu", weights_only=True)
    assert sd["pos_embed_v"].shape == (1, 4 * 16, 64)  # 4 frames x (64/16)^2 patches
    assert sd["pos_embed_a"].shape == (1, 24 * 8, 64)  # (384/16) x (128/16) audio tokens
    recipe = load_recipe(RECIPES / "synthetic.yaml", [f"model.checkpoint={tmp_path / 'cav.pth'}",
                                                      "model.avm.checkpoint="])
    method = build_method(recipe, 0, 1, torch.device("cpu"))  # strict load: raises on any missing/extra key
    for key, value in sd.items():
        assert torch.equal(method.backbone.state_dict()[key], value), key


def test_convert_mae_options_without_a_recipe(tmp_path):
    torch.save(fake_mae_state_dict(), tmp_path / "mae.pth")
    result = runner.invoke(app, ["convert", "mae", str(tmp_path / "mae.pth"), str(tmp_path / "cav.pth"),
                                 "--num-frames", "2", "--target-length", "128", "--num-mel-bins", "64",
                                 "--modality-depth", "1"])
    assert result.exit_code == 0, result.output
    sd = torch.load(tmp_path / "cav.pth", map_location="cpu", weights_only=True)
    assert sd["pos_embed_v"].shape == (1, 2 * 16, 64) and sd["decoder_pos_embed_v"].shape == (1, 2 * 16, 32)
    assert sd["pos_embed_a"].shape == (1, 8 * 4, 64) and "blocks_u.0.norm1_a.weight" in sd
    model = CAVMAE(resolve_model_preset(ModelConfig(preset="tiny")), 2, 64, 128, 64)
    assert load_authors_checkpoint(model, tmp_path / "cav.pth")["missing"] == []


def test_convert_mae_refuses_a_recipe_it_does_not_fit(tmp_path):
    torch.save(fake_mae_state_dict(), tmp_path / "mae.pth")
    out = tmp_path / "cav.pth"
    contradicts = cli("convert", "mae", str(tmp_path / "mae.pth"), str(out), "--recipe",
                      str(RECIPES / "synthetic.yaml"), "--num-frames", "8")
    assert contradicts.returncode == 2 and "Traceback" not in contradicts.stderr + contradicts.stdout
    assert "--num-frames 8 contradicts" in contradicts.stdout and "data.num_frames=4" in contradicts.stdout
    wider = load_recipe(RECIPES / "synthetic.yaml", ["model.embed_dim=96"])
    with pytest.raises(StellaError, match=r"mae.pth: the MAE has embed_dim 64, R sets model.embed_dim=96"):
        convert_mae_for_recipe(tmp_path / "mae.pth", out, recipe=wider, recipe_name="R")
    deeper = load_recipe(RECIPES / "synthetic.yaml", ["model.fusion_depth=2"])
    with pytest.raises(StellaError, match=r"the MAE has depth 2, R sets model.modality_depth \+ model.fusion_depth=3"):
        convert_mae_for_recipe(tmp_path / "mae.pth", out, recipe=deeper, recipe_name="R")
    with pytest.raises(StellaError, match=r"the MAE has embed_dim 64, R sets model.embed_dim=768"):
        convert_mae_for_recipe(tmp_path / "mae.pth", out, recipe=load_recipe(RECIPES / "vggsound_stella.yaml"),
                               recipe_name="R")
    assert not out.exists()  # nothing written for a misfit


def test_chain_recipes_carry_the_authors_values():
    """commands/cav_pretrain_audioset20k_base_init_check.sh and cav_pretrain_submodule_{audioset20k_base,
    vggsound_base_init_check}.sh: epochs 25 / 15 / 8, Adam 1e-4 (0.95, 0.999) wd 5e-7, batch 48, seed 2023."""
    pre, avm_v, avm_a = (load_recipe(RECIPES / f"init_{n}.yaml") for n in ("audioset20k", "avm_vggsound",
                                                                           "avm_audioset"))
    for r, method, epochs in ((pre, "multitask", 25), (avm_v, "avm_pretrain", 15), (avm_a, "avm_pretrain", 8)):
        assert (r.method.name, r.train.epochs, r.train.batch_size, r.train.seed) == (method, epochs, 48, 2023)
        assert (r.optim.lr, r.optim.betas, r.optim.weight_decay) == (1e-4, [0.95, 0.999], 5e-7)
        assert r.model.preset == "base" and r.data.tasks == [] and r.model.avm.checkpoint == ""
    assert pre.model.checkpoint == "runs/init/imagenet_mae.pth"  # where the README's convert command writes
    assert avm_v.model.checkpoint == f"{pre.output.dir}/checkpoints/task01_all.pt" and avm_v.data == pre.data
    assert avm_a.data.dataset == "vggsound" and avm_v.method.stella.matching_loss_weight == 1.0
    assert not avm_v.eval.retrieval and not avm_a.eval.retrieval


# ----------------------------------------------------------------------------------------------------------
# AVM pre-training on a frozen backbone


def avm_pretrain_method(seed=0, lr=1e-2) -> tuple[AVMPretrain, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    backbone = CAVMAE(resolve_model_preset(ModelConfig(preset="tiny")), 2, 32, 64, 32)
    method = METHODS["avm_pretrain"].cls(backbone, MethodConfig(name="avm_pretrain"), avm_cfg=AVMConfig(), batch_size=8,
                                     memory_per_rank=0, seed=seed, rank=0, device=torch.device("cpu"))
    return method, build_optimizer(method, OptimConfig(lr=lr))


def easy_batch(B=8, seed=0) -> dict[str, torch.Tensor]:
    """One fixed batch of 8 random clips: the AVM can learn which audio goes with which video."""
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(B, 1, 64, 32, generator=g), "video": torch.randn(B, 2, 3, 32, 32, generator=g)}


def test_avm_pretrain_trains_only_the_avm():
    method, optimizer = avm_pretrain_method()
    assert isinstance(method, AVMPretrain)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in method.avm.parameters()}  # no backbone weight, so no decay step either
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    avm = {k: v.clone() for k, v in method.avm.state_dict().items()}
    batch, losses = easy_batch(), []
    for _ in range(150):
        optimizer.zero_grad(set_to_none=True)
        out = method(batch)
        assert list(out) == ["loss_vam"]
        out["loss_vam"].backward()
        optimizer.step()
        losses.append(out["loss_vam"].item())
    for key, value in method.backbone.state_dict().items():
        assert torch.equal(value, backbone[key]), key  # bit-identical
    assert all(not torch.equal(v, avm[k]) for k, v in method.avm.state_dict().items())  # every AVM tensor moved
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 0.6 and last < 0.2, (first, last)  # ln 2 = 0.69 at chance; the 8 pairs are learnt


def test_avm_pretrain_backbone_passes_run_without_a_graph(monkeypatch):
    """The unimodal and the joint pass run with autograd off (the authors' Finetune_submodule computes the codes
    under torch.no_grad): no activations are kept for the backbone, and even with its requires_grad switched
    back on no gradient reaches it."""
    method, _ = avm_pretrain_method()
    grad_enabled = []
    for name in ("unimodal_codes", "joint_codes"):
        original = getattr(method.backbone, name)

        def spy(*args, _original=original, _name=name):
            grad_enabled.append((_name, torch.is_grad_enabled()))
            return _original(*args)
        monkeypatch.setattr(method.backbone, name, spy)
    method.backbone.requires_grad_(True)
    method(easy_batch())["loss_vam"].backward()
    assert grad_enabled == [("unimodal_codes", False), ("joint_codes", False)]
    assert all(p.grad is None for p in method.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.avm.parameters())


def test_avm_pretrain_uses_stellas_matching_loss():
    """The same pairs (⌊B/2⌋ positives, deranged negatives) and the same BCE as STELLA's step C, from the same
    generator state: model.matching_loss, not a copy."""
    from stella_cli.model import matching_loss

    method, _ = avm_pretrain_method()
    batch = easy_batch()
    state = method.generators["mask"].get_state()
    loss = method(batch)["loss_vam"]
    generator = torch.Generator().set_state(state)
    with torch.no_grad():
        c_a, c_v = method.backbone.unimodal_codes(batch["audio"], batch["video"])
    assert torch.equal(loss, matching_loss(method.backbone, method.avm, c_a, c_v, generator))


# ----------------------------------------------------------------------------------------------------------
# the chain end to end: fake MAE -> convert -> pre-train -> AVM pre-train -> STELLA from both outputs


def chain_overrides(data_root: Path, out: Path) -> list[str]:
    """The chain's recipes on the tiny synthetic data: the synthetic recipe's input sizes, the tiny model, 1 epoch."""
    return [f"data.root={data_root}", "data.dataset=synthetic", "data.tasks=[]", "data.num_workers=0",
            "data.image_size=64", "data.frame_stride=4", "data.target_length=384", "model.preset=tiny",
            "model.mask_ratio_a=0.75", "model.mask_ratio_v=0.75", "optim.lr=1e-3", "train.epochs=1",
            "train.batch_size=4", "train.log_every=1", f"output.dir={out}"]


def checkpoint(run_dir: Path, name: str = "latest.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


def test_the_initialisation_chain_end_to_end(tmp_path, data_root):
    mae = fake_mae_state_dict()
    torch.save(mae, tmp_path / "mae.pth")
    # step 1: convert the ImageNet MAE for the pre-training recipe
    pretrain = load_recipe(RECIPES / "init_audioset20k.yaml", chain_overrides(data_root, tmp_path / "pretrain")
                           + [f"model.checkpoint={tmp_path / 'init.pth'}"])
    convert_mae_for_recipe(tmp_path / "mae.pth", tmp_path / "init.pth", recipe=pretrain)
    converted = torch.load(tmp_path / "init.pth", weights_only=True)
    # step 2: MAE + contrastive pre-training, one pass over the union of the tasks
    assert pretrain.method.name == "multitask" and pretrain.train.seed == 2023
    pre_dir = run(pretrain, quiet=True)
    assert sorted(p.name for p in (pre_dir / "checkpoints").iterdir()) == ["latest.pt", "task01_all.pt"]
    pre = checkpoint(pre_dir)
    assert pre["position"]["step"] == 8  # 32 clips of both tasks / batch 4
    assert not torch.equal(pre["model"]["blocks_a.0.attn.qkv.weight"], converted["blocks_a.0.attn.qkv.weight"])
    # step 3: the AVM on the frozen pre-trained backbone (model.checkpoint = a `stella train` checkpoint)
    avm_recipe = load_recipe(RECIPES / "init_avm_vggsound.yaml", chain_overrides(data_root, tmp_path / "avm")
                             + [f"model.checkpoint={pre_dir / 'checkpoints' / 'task01_all.pt'}"])
    assert avm_recipe.method.name == "avm_pretrain" and not avm_recipe.eval.retrieval
    random_avm = build_method(avm_recipe, 0, 1, torch.device("cpu")).avm.state_dict()
    avm_dir = run(avm_recipe, quiet=True)
    avm = checkpoint(avm_dir)
    assert avm["position"]["step"] == 8 and set(avm["model"]) == set(pre["model"])
    for key, value in pre["model"].items():
        assert torch.equal(avm["model"][key], value), key  # the backbone is bit-identical
    trained_avm = {k.removeprefix("avm."): v for k, v in avm["method"].items() if k.startswith("avm.")}
    assert trained_avm.keys() == random_avm.keys() and all(not torch.equal(trained_avm[k], random_avm[k])
                                                           for k in random_avm)
    # interrupted after 3 of 8 steps and resumed: the same AVM as the uninterrupted run, bit for bit
    stopped = load_recipe(RECIPES / "init_avm_vggsound.yaml", chain_overrides(data_root, tmp_path / "avm_resumed")
                          + [f"model.checkpoint={pre_dir / 'checkpoints' / 'task01_all.pt'}"])
    with pytest.raises(TrainingInterrupted):
        run(stopped, quiet=True, stop_after=3)
    resumed = checkpoint(run(stopped, quiet=True, resume=True))
    assert all(torch.equal(resumed["method"][k], v) for k, v in avm["method"].items())
    # STELLA from both outputs: its weights at the first step are the loaded ones
    stella = load_recipe(RECIPES / "synthetic.yaml", chain_overrides(data_root, tmp_path / "stella")[:1] + [
        "data.num_workers=0", "train.epochs=1", "train.batch_size=4", "method.memory_size=8",
        f"model.checkpoint={pre_dir / 'checkpoints' / 'latest.pt'}",
        f"model.avm.checkpoint={avm_dir / 'checkpoints' / 'latest.pt'}", f"output.dir={tmp_path / 'stella'}"])
    method = build_method(stella, 0, 1, torch.device("cpu"))
    for key, value in method.backbone.state_dict().items():
        assert torch.equal(value, pre["model"][key]), key
    for key, value in method.avm.state_dict().items():
        assert torch.equal(value, trained_avm[key]), key
    with pytest.raises(TrainingInterrupted):
        run(stella, quiet=True, stop_after=2)
    stella_state = checkpoint(tmp_path / "stella")
    assert stella_state["position"]["step"] == 2 and len(stella_state["method_extra"]["buffer"]["fields"]["video"])
    # a STELLA checkpoint (replay buffer, generators, optimiser inside) loads as either start point too
    assert load_authors_checkpoint(method.backbone, tmp_path / "stella" / "checkpoints" / "latest.pt")["loaded"] \
        == len(pre["model"])
    assert load_avm_checkpoint(method.avm, tmp_path / "stella" / "checkpoints" / "latest.pt")["loaded"] \
        == len(trained_avm)
    assert torch.equal(method.avm.to_a_q.weight, stella_state["method"]["avm.to_a_q.weight"])


# ----------------------------------------------------------------------------------------------------------
# loading run checkpoints: errors


def test_avm_checkpoint_errors(tmp_path, data_root):
    """A run without an AVM, a file that is not a checkpoint, a missing file: one line naming it (exit code 2)."""
    finetune = {"model": CAVMAE(resolve_model_preset(ModelConfig(preset="tiny")), 4, 64, 384, 128).state_dict(),
                "method": {}, "position": {"step": 3}}
    torch.save(finetune, tmp_path / "finetune.pt")
    with pytest.raises(StellaError, match=r"finetune.pt: holds a backbone but no avmatching_module"):
        load_avm_checkpoint(AVM(64, 4), tmp_path / "finetune.pt")
    assert load_authors_checkpoint(CAVMAE(resolve_model_preset(ModelConfig(preset="tiny")), 4, 64, 384, 128),
                                   tmp_path / "finetune.pt")["missing"] == []
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.txt: cannot be read \(16 bytes; truncated or damaged: .*\); "
                                              r"restore the file from a copy"):
        load_avm_checkpoint(AVM(64, 4), tmp_path / "notes.txt")
    with pytest.raises(StellaError, match=r"missing.pt: checkpoint not found"):
        load_authors_checkpoint(AVM(64, 4), tmp_path / "missing.pt")
    recipe = load_recipe(RECIPES / "synthetic.yaml", [f"data.root={data_root}", "method.name=avm_pretrain",
                                                      *RANDOM_START])
    with pytest.raises(StellaError, match="avm_pretrain trains the AVM on a frozen backbone: set model.checkpoint"):
        build_method(recipe, 0, 1, torch.device("cpu"))
    result = cli("train", str(RECIPES / "synthetic.yaml"), "--set", f"data.root={data_root}", "--set",
                 f"output.dir={tmp_path / 'run'}", "--set", f"model.avm.checkpoint={tmp_path / 'finetune.pt'}",
                 "--set", "model.checkpoint=random")
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in out, out
    assert "finetune.pt: holds a backbone but no avmatching_module.* keys, so no AVM weights" in out


# ----------------------------------------------------------------------------------------------------------
# the pre-trained start a recipe names (model.checkpoint, model.checkpoint_made_by)

CHAIN_STEP_2 = "made by `stella train recipes/init_audioset20k.yaml` (step 2 of README \"Initialisation chain\")"


def test_a_paper_recipe_refuses_to_start_without_its_initial_checkpoint(tmp_path, monkeypatch):
    """In an empty folder (no runs/, no data/): one line naming the step that makes the start, exit 2, before any
    data is read (data/vggsound is missing as well, and that error would otherwise come first), nothing written."""
    result = cli("train", str(RECIPES / "vggsound_er.yaml"), cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert (f"{RECIPES / 'vggsound_er.yaml'}: model.checkpoint: runs/init_audioset20k/checkpoints/task01_all.pt not "
            f"found ({CHAIN_STEP_2}, or the authors' audioset_pretrained.pth); pass --set model.checkpoint=PATH, or "
            "--set model.checkpoint=random to start from random weights on purpose") in out, out
    assert list(tmp_path.iterdir()) == []
    monkeypatch.chdir(tmp_path)  # the recipes' relative paths: none of the files exists here
    for recipe, sets, expected in (
            ("audioset_stella.yaml", [], "model.checkpoint: baseline_ckpt/vggsound_pretrained.pth not found (made by "
                                         "the authors: their vggsound_pretrained.pth, whose script is missing, so no "
                                         "init_* step makes it; method.md §9.3 B3)"),
            ("vggsound_stella.yaml", ["model.checkpoint="],
             f"model.checkpoint is empty, but this recipe starts from a pre-trained backbone ({CHAIN_STEP_2}"),
            ("init_audioset20k.yaml", [], "runs/init/imagenet_mae.pth not found (made by `stella convert mae "
                                          "mae_pretrain_vit_base_full.pth runs/init/imagenet_mae.pth --recipe "
                                          "recipes/init_audioset20k.yaml`"),
            ("init_avm_vggsound.yaml", [], "runs/init_audioset20k/checkpoints/task01_all.pt not found "
                                           f"({CHAIN_STEP_2}"),
            ("init_avm_audioset.yaml", [], "no init_* step makes it")):
        with pytest.raises(ValueError, match=re.escape(expected)):
            check_initial_checkpoint(load_recipe(RECIPES / recipe, sets), "R")
    with pytest.raises(StellaError, match=re.escape("data/synthetic/init/backbone/checkpoints/latest.pt not found (made "
                                                    "by `stella reproduce synthetic-init`")):
        check_initial_checkpoint(load_recipe(RECIPES / "synthetic_er.yaml"), "R")  # the synthetic chain's start
    check_initial_checkpoint(load_recipe(RECIPES / "synthetic_er.yaml", ["model.checkpoint=random"]), "R")


def test_random_weights_on_purpose_and_a_resume_without_the_initial_checkpoint(tmp_path, data_root):
    """model.checkpoint=random: said on screen and in the saved config. A run whose start file is gone still
    resumes: its own checkpoint holds every weight."""
    recipe = tmp_path / "paper_like.yaml"  # a synthetic recipe that names a pre-trained start, as a paper recipe
    recipe.write_text(f"extends: {RECIPES / 'synthetic_er.yaml'}\nmodel:\n  checkpoint: {tmp_path / 'start.pt'}\n"
                      "  checkpoint_made_by: '`stella train recipes/init_x.yaml`'\n")
    sets = [f"data.root={data_root}", "data.num_workers=0", "model.preset=tiny", "method.memory_size=12",
            "train.epochs=1", "train.batch_size=4"]
    result = runner.invoke(app, ["train", str(recipe), "--quiet", "--stop-after", "1", "--set",
                                 "model.checkpoint=random", "--set", f"output.dir={tmp_path / 'random'}",
                                 *[a for x in sets for a in ("--set", x)]])
    assert isinstance(result.exception, TrainingInterrupted), result.output  # a checkpoint after one step
    assert "model.checkpoint=random: the backbone starts from random weights (train.seed=2021) instead of the " \
           "pre-trained start the recipe names, on purpose" in " ".join(result.output.split())
    assert load_recipe(tmp_path / "random" / "config.yaml").model.checkpoint == "random"
    (tmp_path / "random" / "checkpoints" / "latest.pt").rename(tmp_path / "start.pt")
    started = load_recipe(recipe, [*sets, f"output.dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingInterrupted):
        run(started, quiet=True, stop_after=2)
    (tmp_path / "start.pt").unlink()
    with pytest.raises(ValueError, match="start.pt not found"):
        run(load_recipe(recipe, [*sets, f"output.dir={tmp_path / 'other'}"]), quiet=True)
    assert retrieval_rows(run(started, quiet=True, resume=True))[-1]["after_task"] == "task2"


# the synthetic tables' chain (`stella reproduce synthetic`): made once, reused, made again when its recipe changes


def synthetic_chain(tmp_path: Path, data_root: Path, backbone_epochs: int = 1, avm_epochs: int = 1) -> list[Path]:
    """The two recipes of reproduce.SYNTHETIC_INIT extending the real ones, on the tiny stream's task2 (4 steps)."""
    (tmp_path / "recipes").mkdir(exist_ok=True)
    out = tmp_path / "init"
    paths = [tmp_path / "recipes" / f"{stem}.yaml" for stem in SYNTHETIC_INIT]
    for path, epochs, name, start in ((paths[0], backbone_epochs, "backbone", ""),
                                      (paths[1], avm_epochs, "avm", out / "backbone" / "checkpoints" / "latest.pt")):
        path.write_text(f"extends: {RECIPES / path.name}\ndata: {{root: {data_root}, tasks: [task2], num_workers: 0}}\n"
                        f"model: {{preset: tiny, checkpoint: '{start}'}}\ntrain: {{epochs: {epochs}, batch_size: 4}}\n"
                        f"output: {{dir: {out / name}}}\n")
    return paths


def test_synthetic_chain_recipes_feed_every_synthetic_recipe():
    backbone, avm = (load_recipe(RECIPES / f"{stem}.yaml") for stem in SYNTHETIC_INIT)
    assert (backbone.method.name, backbone.data.root, backbone.data.tasks) == ("multitask", "data/synthetic/heldout",
                                                                              ["task2"])  # classes the stream lacks
    assert backbone.model.checkpoint == "" and backbone.model.avm.checkpoint == ""  # from random weights
    assert avm.method.name == "avm_pretrain" and avm.data == backbone.data and not avm.eval.retrieval
    assert avm.model.checkpoint == f"{backbone.output.dir}/checkpoints/latest.pt"
    for name in ("synthetic.yaml", "synthetic_er.yaml", "synthetic_stella_plus.yaml", "synthetic_ablation_full.yaml"):
        r = load_recipe(RECIPES / name)
        assert r.model.checkpoint == f"{backbone.output.dir}/checkpoints/latest.pt", name
        assert r.model.avm.checkpoint == f"{avm.output.dir}/checkpoints/latest.pt", name
    assert load_recipe(RECIPES / "synthetic_stella_random_avm.yaml").model.avm.checkpoint == ""  # the authors' B2


def test_synthetic_chain_is_made_once_and_made_again_when_its_recipe_changes(tmp_path, data_root):
    backbone, avm = synthetic_chain(tmp_path, data_root)
    latest = {name: tmp_path / "init" / name / "checkpoints" / "latest.pt" for name in ("backbone", "avm")}

    def make_init_chain(steps: list[Path]) -> list:
        return run_parallel(chain_jobs(steps), 1, tmp_path / "logs")

    first = make_init_chain([backbone, avm])
    assert [o.status for o in first] == ["finished", "finished"]
    assert checkpoint(tmp_path / "init" / "backbone")["position"]["step"] == 4  # 16 task2 clips / batch 4
    made = {name: path.stat().st_mtime_ns for name, path in latest.items()}

    again = make_init_chain([backbone, avm])  # unchanged: reused, nothing trained
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert {name: path.stat().st_mtime_ns for name, path in latest.items()} == made

    synthetic_chain(tmp_path, data_root, avm_epochs=2)  # the AVM's recipe changed: only the AVM is made again
    assert [o.status for o in make_init_chain([backbone, avm])] == ["skipped", "finished"]
    assert latest["backbone"].stat().st_mtime_ns == made["backbone"]
    assert checkpoint(tmp_path / "init" / "avm")["position"]["step"] == 8

    synthetic_chain(tmp_path, data_root, backbone_epochs=2, avm_epochs=2)  # the backbone's: both, in order
    assert [o.status for o in make_init_chain([backbone, avm])] == ["finished", "finished"]
    assert checkpoint(tmp_path / "init" / "backbone")["position"]["step"] == 8
    trained = checkpoint(tmp_path / "init" / "avm")["model"]
    for key, value in checkpoint(tmp_path / "init" / "backbone")["model"].items():
        assert torch.equal(trained[key], value), key  # the AVM sits on the new backbone
    keys = json.loads((tmp_path / "init" / "chain.json").read_text())
    assert set(keys) == {"backbone", "avm"} and keys["avm"]["recipe"] == str(avm)


def test_chain_key_follows_the_recipe_the_data_and_the_previous_step(tmp_path, data_root):
    backbone, avm = synthetic_chain(tmp_path, data_root)
    key = chain_key(backbone, "")
    assert key == chain_key(backbone, "") and len(key) == 64
    assert chain_key(avm, key) != chain_key(avm, "another backbone")
    meta = data_root / "meta.json"
    original = meta.read_text()
    try:
        meta.write_text(original.replace('"seed": 0', '"seed": 1'))  # the same folder, other data
        assert chain_key(backbone, "") != key
    finally:
        meta.write_text(original)
    synthetic_chain(tmp_path, data_root, backbone_epochs=3)
    assert chain_key(backbone, "") != key
    bad = tmp_path / "recipes" / "elsewhere.yaml"
    bad.write_text(f"extends: {backbone}\ndata: {{root: {tmp_path / 'missing'}}}\n")
    with pytest.raises(StellaError, match=r"missing/meta.json: .*elsewhere.yaml trains on .* not prepared"):
        chain_key(bad, "")
