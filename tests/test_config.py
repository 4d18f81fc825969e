"""Recipe loading, `extends:`, `--set` overrides and validation errors (config.py)."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch

from stella_cli.factory import METHODS, check_method
from stella_cli.config import (MODEL_PRESETS, RecipeError, load_recipe, num_core_tokens, per_rank_batch,
                               per_rank_memory, recipe_from_dict, recipe_to_dict)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """
data: {dataset: synthetic, root: data/x}
output: {dir: runs/x}
"""


def test_defaults_equal_the_authors_code(tmp_path):
    r = load_recipe(write(tmp_path, "r.yaml", MINIMAL))
    # method.md §9.2
    assert (r.optim.lr, r.optim.betas, r.optim.weight_decay) == (1e-4, [0.95, 0.999], 5e-7)
    assert (r.train.epochs, r.train.batch_size, r.train.seed) == (10, 48, 2021)
    s = r.method.stella
    assert (s.core_video_ratio, s.core_audio_ratio, s.num_core_audio_times, s.att_temperature) == (0.5, 0.5, 4, 0.4)
    assert (r.method.memory_size, r.method.alpha, s.matching_loss_weight) == (2000, 0.5, 1.0)
    assert (r.model.mask_ratio_v, r.model.contrast_tau, r.model.contrast_weight) == (0.8, 0.05, 0.1)
    assert (r.data.num_frames, r.data.image_size, r.data.target_length, r.data.num_mel_bins) == (4, 224, 1024, 128)
    assert (r.data.fbank_mean, r.data.fbank_std) == (-5.081, 4.4849)
    # the base preset is filled in: 768-d, 12 heads, 10 + 2 layers, decoder 512 x 8 x 16 heads
    m = r.model
    assert (m.embed_dim, m.num_heads, m.modality_depth, m.fusion_depth) == (768, 12, 10, 2)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    assert not m.avm.fix_head_reshape and m.avm.num_heads == 12
    assert r.optim.amp == "fp16" and r.model.checkpoint == ""  # fp16 autocast + GradScaler; random weights


def test_shipped_recipes_load():
    synthetic = load_recipe(RECIPES / "synthetic.yaml")
    assert synthetic.data.dataset == "synthetic" and synthetic.model.preset == "tiny"
    assert synthetic.model.embed_dim == MODEL_PRESETS["tiny"]["embed_dim"]  # the preset fills the sizes
    assert (synthetic.optim.lr, synthetic.model.contrast_weight, synthetic.train.epochs) == (1e-3, 0.1, 10)
    vgg = load_recipe(RECIPES / "vggsound_seq.yaml")
    assert vgg.data.tasks == ["sports", "music", "vehicle", "people", "animals", "home_nature", "others_part1",
                              "others_part2"]
    assert (vgg.train.epochs, vgg.train.batch_size, vgg.method.memory_size) == (10, 48, 2000)
    audioset = load_recipe(RECIPES / "audioset_seq.yaml")  # extends vggsound_seq.yaml
    assert audioset.data.tasks == ["human", "vehicle", "nature", "animal", "others", "home", "music"]
    assert (audioset.train.epochs, audioset.train.batch_size, audioset.method.memory_size) == (15, 36, 5000)
    assert audioset.model.preset == "base" and audioset.optim.betas == [0.95, 0.999]  # inherited
    finetune = load_recipe(RECIPES / "synthetic_finetune.yaml")
    assert finetune.method.name == "finetune" and finetune.data.image_size == 64


def test_extends_merges_nested_sections(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "method: {name: stella, stella: {att_temperature: 0.2}}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nmethod: {stella: {core_video_ratio: 0.25}}\n")
    r = load_recipe(child)
    assert r.method.stella.att_temperature == 0.2  # kept from the parent
    assert r.method.stella.core_video_ratio == 0.25  # overridden by the child


def test_overrides_are_parsed_and_typed(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    r = load_recipe(path, ["optim.lr=5e-5", "train.epochs=3", "data.tasks=[a, b]", "model.avm.fix_head_reshape=true",
                           "method.replay_batch_size=null", "train.batch_size=8", "model.embed_dim=96"])
    assert r.optim.lr == 5e-5 and isinstance(r.optim.lr, float)
    assert r.train.epochs == 3 and r.data.tasks == ["a", "b"] and r.model.avm.fix_head_reshape is True
    assert r.method.replay_batch_size is None and r.train.batch_size == 8
    assert r.model.embed_dim == 96 and r.model.num_heads == 12  # explicit size wins, the rest from the preset
    assert load_recipe(path, ["optim.lr=1"]).optim.lr == 1.0  # an int is accepted where a float is expected


def test_the_avm_has_the_authors_12_heads_whatever_the_backbone(tmp_path):
    """avm_module.py:7: CrossModalAttention(dim, num_heads=12), never passed another count; the tiny CPU preset's
    64-d does not split into 12 and keeps the backbone's 4; model.avm.num_heads sets any count that divides the
    width."""
    from stella_cli.model import CAVMAE
    from stella_cli.stella import build_avm

    path = write(tmp_path, "r.yaml", MINIMAL)
    assert load_recipe(path, ["model.num_heads=8"]).model.avm.num_heads == 12  # not the backbone's 8
    assert load_recipe(path, ["model.preset=small"]).model.avm.num_heads == 12
    assert load_recipe(path, ["model.preset=tiny"]).model.avm.num_heads == 4
    assert load_recipe(path, ["model.avm.num_heads=8"]).model.avm.num_heads == 8
    with pytest.raises(RecipeError, match=r"r\.yaml: model\.avm\.num_heads: 7 must divide model\.embed_dim=768 \(e\.g\. "
                                          r"model\.avm\.num_heads=12, the backbone's\)"):
        load_recipe(path, ["model.avm.num_heads=7"])
    tiny = load_recipe(path, ["model.preset=tiny", "model.avm.num_heads=2"]).model
    backbone = CAVMAE(tiny, 2, 32, 64, 32)
    assert build_avm(backbone, tiny.avm).num_heads == 2 and backbone.num_heads == 4
    assert build_avm(backbone, dataclasses.replace(tiny.avm, num_heads=None)).num_heads == 4  # never resolved


def test_precision_is_the_authors_fp16_with_a_loss_scaler():
    """`torch.cuda.amp.autocast()` (fp16) + GradScaler (pretrain.py:88, utils/amp.py); bf16 and auto stay
    available without a scaler; the CPU runs fp32."""
    from stella_cli.distributed import amp_dtype, grad_scaler

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert (amp_dtype("fp16", cuda), amp_dtype("bf16", cuda), amp_dtype("none", cuda)) == \
        (torch.float16, torch.bfloat16, None)
    assert amp_dtype("fp16", cpu) is None and amp_dtype("bf16", cpu) is None
    assert grad_scaler(torch.float16, cpu).is_enabled()  # (the CPU GradScaler; on CUDA the same call)
    assert not grad_scaler(torch.bfloat16, cpu).is_enabled() and not grad_scaler(None, cpu).is_enabled()
    assert grad_scaler(torch.float16, cpu).get_scale() == 2.0 ** 16  # torch's default, as the authors'


@pytest.mark.parametrize("text, overrides, expected", [
    (MINIMAL + "optim: {lrr: 0.1}\n", [], r"r\.yaml: unknown key optim\.'lrr'; did you mean optim\.'lr'\?"),
    (MINIMAL + "trian: {epochs: 1}\n", [], r"unknown key 'trian'; did you mean 'train'\?"),
    (MINIMAL, ["train.epochs=ten"], r"train\.epochs: expected int, got str 'ten'"),
    (MINIMAL, ["train.epochs=true"], r"train\.epochs: expected int, got bool True"),
    (MINIMAL, ["optim.betas=0.9"], r"optim\.betas: expected a list"),
    (MINIMAL, ["method.stella.core_ratio=0.3"], r"unknown key method\.stella\.'core_ratio'; did you mean"),
    (MINIMAL, ["train.epochs"], r"expected key\.sub=value"),
    (MINIMAL, ["model.preset=huge"], r"model\.preset: 'huge' is not one of base, small, tiny"),
    (MINIMAL, ["eval.avs.select_epoch=best"], r"eval\.avs\.select_epoch: 'best' is not one of last, best_test "
                                               r"\(did you mean 'best_test'\?\)"),
    (MINIMAL, ["eval.ave.audio_starts=second"], r"eval\.ave\.audio_starts: 'second' is not one of authors, seconds"),
    (MINIMAL, ["eval.avs.test_batch=0"], r"eval\.avs\.test_batch: 0 must be at least 1"),
    (MINIMAL, ["eval.classification.eval_every=-1"], r"eval\.classification\.eval_every: -1 must be at least 1"),
    ("data: {dataset: synthetic, root: x}\n", [], r"r\.yaml: missing required key 'output\.dir'"),
    ("output: {dir: x}\ndata: {root: x}\n", [], r"missing required key 'data\.dataset'"),
    ("data: [1, 2]\n", [], r"data: expected a mapping"),
    ("- a\n- b\n", [], r"a recipe must be a mapping"),
    ("data: {dataset: [\n", [], r"not valid YAML"),
])
def test_bad_recipes_name_the_file_and_key(tmp_path, text, overrides, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(write(tmp_path, "r.yaml", text), overrides)


def test_method_names_are_the_keys_of_the_method_table(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    with pytest.raises(RecipeError, match=r"r\.yaml: method\.name: 'stela' is not one of multitask, finetune.*"
                                          r"\(did you mean 'stella'\?\)"):
        check_method(load_recipe(path, ["method.name=stela"]), str(path))
    with pytest.raises(RecipeError, match=r"method\.memory_size: 0 must be at least 1 for stella\+"):
        check_method(load_recipe(path, ["method.name=stella+", "method.memory_size=0"]), str(path))
    check_method(load_recipe(path, ["method.name=er", "method.memory_size=0"]), str(path))  # ER without a memory
    assert set(METHODS) == {"multitask", "finetune", "er", "mir", "derpp", "gmed", "clser", "esmer", "lump", "stella",
                            "stella+", "avm_pretrain"}


def test_missing_file_and_extends_cycle(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_round_trip_through_dict(tmp_path):
    r = load_recipe(write(tmp_path, "r.yaml", MINIMAL), ["method.stella.att_temperature=0.3"])
    assert recipe_from_dict(recipe_to_dict(r)) == r


def test_derived_values():
    r = load_recipe(RECIPES / "vggsound_seq.yaml")
    assert per_rank_batch(r.train, 4) == 12  # method.md §9.3 B13
    assert per_rank_memory(r.method, 4) == 500  # method.md §3.9
    assert num_core_tokens(784, 0.5) == 392 and num_core_tokens(512, 0.5) == 256
    with pytest.raises(RecipeError, match="not divisible by world size 5"):
        per_rank_batch(r.train, 5)
