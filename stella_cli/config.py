"""Recipes: typed dataclasses, YAML loading with `extends:`, `key.sub=value` overrides, validation.

Every default equals the authors' code (stella_spec §9.2, protocol.md) unless a comment says otherwise. A
recipe is resolved once (extends merged, overrides applied, model preset filled in) and then treated as frozen:
derived values (per-rank batch, K_V, K_A, ...) come from functions, never from writing back into the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe problem, with the file and the key path in the message."""


# ----------------------------------------------------------------------------------------------------------
# sections


@dataclass
class DataConfig:
    dataset: str = ""  # required: synthetic | vggsound | audioset
    root: str = ""  # required: the folder `stella prep ... --out` wrote (manifests + cache)
    tasks: list[str] = field(default_factory=list)  # training order; empty = every task of the prepared data
    num_frames: int = 4  # spec §7.2: 4 frames ...
    frame_stride: int = 8  # ... 8 cached frames apart (1 fps from the 8 fps cache)
    image_size: int = 224  # spec §1.1; frames are cropped/resized to this
    target_length: int = 1024  # fbank frames (10 s at 10 ms shift, padded); must match the cache
    num_mel_bins: int = 128  # must match the cache
    fbank_mean: float = -5.081  # spec §7.2: fbank is normalised as (x - fbank_mean) / fbank_std
    fbank_std: float = 4.4849
    train_noise: bool = True  # spec §7.2: U(0,1)*r/10 additive noise, r ~ U(0,1) per clip
    train_time_roll: bool = True  # spec §7.2: circular roll along time
    multiscale_crop: bool = True  # spec §7.2: GroupMultiScaleCrop shared by all frames (train only)
    num_workers: int = 4  # DataLoader workers per rank


@dataclass
class AVMConfig:
    fix_head_reshape: bool = False  # faithful: reshape without permute (spec §9.3 B6); true = heads merged properly
    checkpoint: str = ""  # pre-trained AVM weights (spec §2.5); "" = random init as the shipped scripts (B2)


@dataclass
class ModelConfig:
    """Backbone size. `preset` fills every size field left at None (see MODEL_PRESETS)."""

    preset: str = "base"  # base | small | tiny
    embed_dim: int | None = None
    num_heads: int | None = None
    modality_depth: int | None = None  # modality-specific layers (the authors' mid_fusion_depth)
    fusion_depth: int | None = None  # shared fusion layers (depth - mid_fusion_depth)
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mlp_ratio: float | None = None
    patch_size: int = 16  # spec §1.1, video and audio
    mask_ratio_v: float = 0.8  # spec §1.5
    mask_ratio_a: float = 0.8
    norm_pix_loss: bool = True  # spec §1.7 (set by every pretraining command)
    contrast_tau: float = 0.05  # spec §1.7
    contrast_weight: float = 0.1
    mae_weight: float = 1.0
    # faithful: true = the authors' all-gather, where other ranks' embeddings are constants, so the contrastive
    # gradient depends on the number of GPUs; false (default) = the gradient of one process on the whole batch
    faithful_contrast_grad: bool = False
    avm: AVMConfig = field(default_factory=AVMConfig)
    checkpoint: str = ""  # initial backbone weights (authors' key names, or a `stella convert mae` output)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # spec §1.1 / §9.2: the paper's ViT-B two-stream model
    "base": dict(embed_dim=768, num_heads=12, modality_depth=10, fusion_depth=2, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0),
    # CPU sizes for the synthetic benchmark and the tests (not in the paper)
    "small": dict(embed_dim=192, num_heads=3, modality_depth=3, fusion_depth=1, decoder_embed_dim=128,
                  decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0),
    "tiny": dict(embed_dim=64, num_heads=4, modality_depth=1, fusion_depth=1, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0),
}


@dataclass
class StellaConfig:
    core_video_ratio: float = 0.5  # spec §9.2: keep int(L_V * (1 - r)) = 392 video patches
    core_audio_ratio: float = 0.5  # keep 256 audio patches
    num_core_audio_times: int = 4  # audio chunk = 4 time tokens (0.64 s) x all frequency bins
    att_temperature: float = 0.4  # tau of the importance softmax (spec §3.2)
    matching_loss_weight: float = 1.0  # L_vam weight (spec §2.4)
    faithful_plus_rca_rows: bool = False  # STELLA+ only: reproduce bug B8 (spec §9.3); false = fixed
    frozen_bf16: bool = False  # speed, not bit-identical: frozen scoring passes (Steps A-C's joint codes) in bf16


@dataclass
class MethodConfig:
    name: str = "stella"  # finetune | multitask | stella | stella+
    memory_size: int = 2000  # total replay slots over all ranks (spec §3.9); 5000 on AudioSet
    replay_batch_size: int | None = None  # None = the per-rank training batch (spec §9.2)
    alpha: float = 0.5  # DER-style logit replay weight (spec §3.8)
    stella: StellaConfig = field(default_factory=StellaConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # spec §5.3: Adam, constant LR, one optimiser for the whole stream
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 5e-7  # L2-style, on weights with ndim > 1 only
    amp: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU) | bf16 | fp16 | none
    micro_batch_size: int | None = None  # per-rank micro batch for gradient accumulation; None = whole batch


@dataclass
class TrainConfig:
    epochs: int = 10  # per task (VGGSound 10, AudioSet 15)
    batch_size: int = 48  # global batch of current clips (spec §5.3: 12 per GPU x 4)
    seed: int = 2021
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 0  # steps between 'latest' checkpoints inside a task; 0 = only at task ends
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalConfig:
    retrieval: bool = True  # zero-shot A<->V retrieval after every task (spec §6.1)
    batch_size: int = 32
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class OutputConfig:
    dir: str = ""  # required: the run directory


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


REQUIRED_KEYS = ("data.dataset", "data.root", "output.dir")
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("synthetic", "vggsound", "audioset"),
    "model.preset": tuple(MODEL_PRESETS),
    "method.name": ("finetune", "multitask", "stella", "stella+"),
    "optim.amp": ("auto", "bf16", "fp16", "none"),
    "train.device": ("auto", "cpu", "cuda"),
}


# ----------------------------------------------------------------------------------------------------------
# loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (following `extends:`), apply `key.sub=value` overrides, validate, fill the preset."""
    raw = _read_with_extends(Path(path), seen=())
    for item in overrides:
        key, value = _parse_override(item)
        _set_path(raw, key.split("."), value, source=f"--set {item}")
    recipe = _build(Recipe, raw, prefix="", source=str(path))
    _check_required_and_choices(recipe, source=str(path))
    return resolve_preset(recipe)


def resolve_preset(recipe: Recipe) -> Recipe:
    """The recipe with its model sizes filled from `model.preset` (see resolve_model_preset)."""
    return dataclasses.replace(recipe, model=resolve_model_preset(recipe.model))


def resolve_model_preset(model: ModelConfig) -> ModelConfig:
    """Fill every size field left at None from `model.preset` (explicit values win)."""
    preset = MODEL_PRESETS[model.preset]
    return dataclasses.replace(model, **{k: v for k, v in preset.items() if getattr(model, k) is None})


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Rebuild a recipe from `recipe_to_dict` output (e.g. the config saved in a run directory)."""
    recipe = _build(Recipe, raw, prefix="", source=source)
    _check_required_and_choices(recipe, source=source)
    return resolve_preset(recipe)


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: `extends:` cycle through {' -> '.join(str(p) for p in seen)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_with_extends((path.parent / parent), seen + (path.resolve(),))
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key.sub=value, e.g. optim.lr=5e-5")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {item!r}: cannot parse value {text!r}: {err}") from err
    return key.strip(), value


def _set_path(raw: dict[str, Any], keys: list[str], value: Any, source: str) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: {k!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"{source}: unknown key {prefix}{key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{source}: {key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"{source}: {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def _check_required_and_choices(recipe: Recipe, source: str) -> None:
    for key in REQUIRED_KEYS:
        if get_path(recipe, key) in ("", None):
            raise RecipeError(f"{source}: missing required key {key!r}")
    for key, allowed in CHOICES.items():
        value = get_path(recipe, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{source}: {key}: {value!r} is not one of {', '.join(allowed)}{hint}")


def get_path(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------------------
# derived values (never stored back into the recipe)


def per_rank_batch(train: TrainConfig, world_size: int) -> int:
    """spec §9.3 B13: the global batch is split over ranks (48 / 4 GPUs = 12 per GPU)."""
    if train.batch_size % world_size:
        raise RecipeError(f"train.batch_size={train.batch_size} is not divisible by world size {world_size}")
    return train.batch_size // world_size


def per_rank_memory(method: MethodConfig, world_size: int) -> int:
    """spec §3.9: each rank keeps an independent reservoir of memory_size // world_size slots."""
    return method.memory_size // world_size


def token_counts(num_frames: int, image_size: int, target_length: int, num_mel_bins: int,
                 patch_size: int) -> tuple[int, int]:
    """(L_V, L_A): F·(S/p)² video tokens and (T/p)·(M/p) audio tokens; (784, 512) for the paper's inputs."""
    return num_frames * (image_size // patch_size) ** 2, (target_length // patch_size) * (num_mel_bins // patch_size)


def num_core_tokens(num_tokens: int, core_ratio: float) -> int:
    """K = int(L * (1 - core_ratio)); 784 -> 392 and 512 -> 256 at the default 0.5 (spec §3.7)."""
    return int(num_tokens * (1 - core_ratio))
