"""The initialisation chain before continual pre-training (stella_spec §1.9, §2.5): `stella convert mae` for a recipe.

ImageNet MAE  --convert mae-->  init.pth  --recipes/init_audioset20k.yaml-->  AudioSet-20K backbone
  --recipes/init_avm_vggsound.yaml-->  AVM for the VGGSound stream.  The converted file must fit the recipe that
loads it (model.checkpoint): its input sizes are baked into the positional tables, and the MAE's sizes must be the
recipe's model sizes.  `convert_mae_for_recipe` takes the former from the recipe and checks the latter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stella_cli.config import Recipe
from stella_cli.model import CAVMAE, convert_mae, mae_sizes, read_state_dict

DEFAULT_INPUTS = {"num_frames": 4, "target_length": 1024, "num_mel_bins": 128, "modality_depth": 10}  # spec §1.1


def recipe_inputs(recipe: Recipe) -> dict[str, int]:
    """What the conversion takes from a recipe: the frames per clip (video pos-embed repeats), the fbank length and
    mel bins (audio table sizes) and the number of modality layers (MAE blocks copied into both streams)."""
    d, m = recipe.data, recipe.model
    return {"num_frames": d.num_frames, "target_length": d.target_length, "num_mel_bins": d.num_mel_bins,
            "modality_depth": m.modality_depth}


OPTION_KEYS = {"num_frames": "data.num_frames", "target_length": "data.target_length",
               "num_mel_bins": "data.num_mel_bins", "modality_depth": "model.modality_depth"}


def recipe_sizes(recipe: Recipe) -> dict[str, Any]:
    """The recipe's value of each size the MAE fixes (convert_mae's report["sizes"]), keyed like the report."""
    m = recipe.model
    return {"embed_dim": m.embed_dim, "depth": m.modality_depth + m.fusion_depth, "patch_size": m.patch_size,
            "image_size": recipe.data.image_size, "decoder_embed_dim": m.decoder_embed_dim,
            "decoder_depth": m.decoder_depth, "mlp_ratio": m.mlp_ratio}


SIZE_KEYS = {"embed_dim": "model.embed_dim", "depth": "model.modality_depth + model.fusion_depth",
             "patch_size": "model.patch_size", "image_size": "data.image_size",
             "decoder_embed_dim": "model.decoder_embed_dim", "decoder_depth": "model.decoder_depth",
             "mlp_ratio": "model.mlp_ratio"}


def convert_mae_for_recipe(checkpoint: str | Path, out: str | Path, *, recipe: Recipe | None = None,
                           recipe_name: str = "the recipe", faithful_zeros: bool = True,
                           **options: int | None) -> dict[str, Any]:
    """`stella convert mae CKPT OUT [--recipe R] [--num-frames ...]`.

    options: num_frames, target_length, num_mel_bins, modality_depth (None = from the recipe, else the paper's
    4 / 1024 / 128 / 10).  With a recipe, an option that contradicts it is refused, a MAE whose sizes differ from
    the recipe's model is refused naming the recipe key, and the output must load strictly into the recipe's model
    (same keys and shapes), else it is deleted.  Returns convert_mae's report.
    """
    chosen = dict(DEFAULT_INPUTS)
    if recipe is not None:
        from_recipe = recipe_inputs(recipe)
        for key, value in options.items():
            if value is not None and value != from_recipe[key]:
                raise ValueError(f"--{key.replace('_', '-')} {value} contradicts {recipe_name}: "
                                 f"{OPTION_KEYS[key]}={from_recipe[key]} (drop the option or change the recipe)")
        chosen = from_recipe
    else:
        chosen.update({k: v for k, v in options.items() if v is not None})
    if recipe is not None:  # before writing anything: the MAE's sizes must be the recipe's
        want = recipe_sizes(recipe)
        for key, value in mae_sizes(read_state_dict(checkpoint), checkpoint).items():
            if want[key] != value:
                raise ValueError(f"{checkpoint}: the MAE has {key} {value}, {recipe_name} sets {SIZE_KEYS[key]}="
                                 f"{want[key]}")
    report = convert_mae(checkpoint, out, faithful_zeros=faithful_zeros, **chosen)
    if recipe is not None:
        try:
            check_fits_recipe(report, recipe, recipe_name, checkpoint)
        except ValueError:
            Path(out).unlink(missing_ok=True)
            raise
    return report


def check_fits_recipe(report: dict[str, Any], recipe: Recipe, recipe_name: str, checkpoint: str | Path) -> None:
    """The converted state dict (report["out"]) has exactly the keys and shapes of the recipe's CAVMAE."""
    d = recipe.data
    with torch.device("meta"):  # shapes only: no memory, no init
        model = CAVMAE(recipe.model, d.num_frames, d.image_size, d.target_length, d.num_mel_bins)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in torch.load(report["out"], map_location="cpu", weights_only=True).items()}
    if got != expected:
        diff = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ValueError(f"{checkpoint}: the converted weights do not fit {recipe_name}'s model: {len(diff)} keys "
                         f"differ, e.g. {diff[:4]}")
