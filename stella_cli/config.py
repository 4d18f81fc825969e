"""Recipes: typed dataclasses, YAML loading with `extends:`, `key.sub=value` overrides, validation.

Every default equals the authors' code (method.md §9.2, docs/protocol.md) unless a comment says otherwise. A
recipe is resolved once (extends merged, overrides applied, model preset filled in) and then treated as frozen:
derived values (per-rank batch, K_V, K_A, ...) come from functions, never from writing back into the config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stella_cli.errors import StellaError


class RecipeError(StellaError, ValueError):
    """A recipe problem, with the file and the key path in the message (exit code 2)."""


# ----------------------------------------------------------------------------------------------------------
# sections


@dataclass
class DataConfig:
    dataset: str = ""  # required: synthetic | vggsound | audioset
    root: str = ""  # required: the folder `stella prep ... --out` wrote (manifests + cache)
    tasks: list[str] = field(default_factory=list)  # training order; empty = every task of the prepared data
    num_frames: int = 4  # method.md §7.2: 4 frames ...
    frame_stride: int = 8  # ... 8 cached frames apart (1 fps from the 8 fps cache)
    image_size: int = 224  # method.md §1.1; frames are cropped/resized to this
    target_length: int = 1024  # fbank frames (10 s at 10 ms shift, padded); must match the cache
    num_mel_bins: int = 128  # must match the cache
    fbank_mean: float = -5.081  # method.md §7.2: fbank is normalised as (x - fbank_mean) / fbank_std
    fbank_std: float = 4.4849
    train_noise: bool = True  # method.md §7.2: U(0,1)*r/10 additive noise, r ~ U(0,1) per clip
    train_time_roll: bool = True  # method.md §7.2: circular roll along time
    multiscale_crop: bool = True  # method.md §7.2: GroupMultiScaleCrop shared by all frames (train only)
    num_workers: int = 4  # DataLoader workers per rank


@dataclass
class AVMConfig:
    fix_head_reshape: bool = False  # faithful: reshape without permute (method.md §9.3 B6); true = heads merged right
    checkpoint: str = ""  # pre-trained AVM weights (method.md §2.5); "" = random init as the shipped scripts (B2)
    # attention heads of the AVM; None = the preset's (AVM_PRESET_HEADS: 12 at base, as the authors' AVM at any
    # width; an AVMConfig built in code and never resolved takes the backbone's). method.md §9.3 "AVM heads"
    num_heads: int | None = None


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
    patch_size: int = 16  # method.md §1.1, video and audio
    mask_ratio_v: float = 0.8  # method.md §1.5
    mask_ratio_a: float = 0.8
    norm_pix_loss: bool = True  # method.md §1.7 (set by every pretraining command)
    contrast_tau: float = 0.05  # method.md §1.7
    contrast_weight: float = 0.1
    mae_weight: float = 1.0
    # faithful: true = the authors' all-gather, where other ranks' embeddings are constants, so the contrastive
    # gradient depends on the number of GPUs; false (default) = the gradient of one process on the whole batch
    faithful_contrast_grad: bool = False
    avm: AVMConfig = field(default_factory=AVMConfig)
    # initial backbone weights: a file (the authors' key names, a `stella convert mae` output or a `stella train`
    # checkpoint); "" = random weights (the synthetic recipes); "random" = random weights on purpose where the recipe
    # names a pre-trained start, said in the run's log (factory.check_initial_checkpoint)
    checkpoint: str = ""
    # what writes `checkpoint` (a command of the initialisation chain), named when the file is missing; a recipe
    # that sets it never starts without `checkpoint` (the paper's streams and the chain's later steps)
    checkpoint_made_by: str = ""


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # method.md §1.1 / §9.2: the paper's ViT-B two-stream model
    "base": dict(embed_dim=768, num_heads=12, modality_depth=10, fusion_depth=2, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0),
    # CPU sizes for the synthetic benchmark and the tests (not in the paper)
    "small": dict(embed_dim=192, num_heads=3, modality_depth=3, fusion_depth=1, decoder_embed_dim=128,
                  decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0),
    "tiny": dict(embed_dim=64, num_heads=4, modality_depth=1, fusion_depth=1, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0),
}
# model.avm.num_heads left at None: the authors' AVM always has 12 heads (method.md §9.3 "AVM heads"); the tiny
# CPU model's 64-d does not split into 12, so its AVM takes the backbone's 4
AVM_PRESET_HEADS = {"base": 12, "small": 12, "tiny": 4}
RANDOM = "random"  # model.checkpoint: start from random weights on purpose


@dataclass
class StellaConfig:
    core_video_ratio: float = 0.5  # method.md §9.2: keep int(L_V * (1 - r)) = 392 video patches
    core_audio_ratio: float = 0.5  # keep 256 audio patches
    num_core_audio_times: int = 4  # audio chunk = 4 time tokens (0.64 s) x all frequency bins
    att_temperature: float = 0.4  # tau of the importance softmax (method.md §3.2)
    matching_loss_weight: float = 1.0  # L_vam weight (method.md §2.4)
    faithful_plus_rca_rows: bool = False  # STELLA+ only: reproduce bug B8 (method.md §9.3); false = fixed
    # patch-selection ablation (baselines.md §2.13): full (the paper's method) | random (uniform patches and
    # audio chunks, no AVM) | importance (AVM importance, no RCA pruning) | correlation (RCA pruning, uniform choice)
    selection: str = "full"
    frozen_bf16: bool = False  # speed, not bit-identical: frozen scoring passes (Steps A-C's joint codes) in bf16


@dataclass
class LumpConfig:
    mixup_alpha: float = 0.1  # baselines.md §2.5: lambda ~ Beta(a, a); VGGSound 0.1, AudioSet 0.05 (config 0.5)


@dataclass
class MirConfig:
    candidates_factor: int = 5  # baselines.md §2.6: 5 x per-rank replay batch candidates (60 / 45 per GPU)
    same_masks: bool = False  # faithful: pre and post scores use different random masks; true = the same masks
    fix_virtual_step: bool = False  # faithful: local, unscaled virtual gradient; true = GradScaler + DDP average


@dataclass
class GmedConfig:
    gamma: float = 0.1  # baselines.md §2.7: edit stride (grad_stride)
    beta: float = 0.05  # regularisation strength (reg_strength); VGGSound 0.05, AudioSet 0.01
    decay: float = 1.0  # edit decay d: the step is scaled by (1 - d) ** age
    age_samples: bool = False  # faithful: ages never grow, so d is inert; true = each edit ages the slot by 1
    fix_virtual_step: bool = False  # as method.mir.fix_virtual_step


@dataclass
class ClsErConfig:
    reg_weight: float = 0.1  # baselines.md §2.8: consistency weight r
    plastic_update_prob: float = 0.8  # probability of an EMA update of the plastic teacher per step
    plastic_alpha: float = 0.999  # EMA decay cap (a = min(1 - 1/(t+1), alpha))
    stable_update_prob: float = 0.6
    stable_alpha: float = 0.999
    temperature: float = 0.05  # of the teachers' diagonal contrastive probabilities (clser.py compute_vacon)
    ema_after_step: bool = False  # faithful: EMA inside the forward, before the optimiser step; true = after it


@dataclass
class EsmerConfig:
    reg_weight: float = 0.15  # baselines.md §2.9 (STELLA@8ed637f configs/cl_algo/esmer.yaml)
    ema_update_prob: float = 0.2
    ema_alpha: float = 0.999
    loss_margin: float = 2.5  # clips with teacher loss >= margin x running mean are down-weighted (> : not stored)
    loss_alpha: float = 0.99  # EMA rate cap of the running loss statistics
    std_margin: float = 1.0  # losses above mean + std_margin x std are left out of the running statistics
    ema_after_step: bool = False  # as method.clser.ema_after_step


@dataclass
class MethodConfig:
    name: str = "stella"  # a key of factory.METHODS (checked when the run starts: factory.check_method)
    # | avm_pretrain (the initialisation chain: only the AVM trains, on a frozen backbone, method.md §2.5)
    memory_size: int = 2000  # total replay slots over all ranks (method.md §3.9); 5000 on AudioSet
    replay_batch_size: int | None = None  # None = the per-rank training batch (method.md §9.2)
    alpha: float = 0.5  # DER-style logit replay weight (method.md §3.8; DER++ baselines.md §2.4)
    stella: StellaConfig = field(default_factory=StellaConfig)
    lump: LumpConfig = field(default_factory=LumpConfig)
    mir: MirConfig = field(default_factory=MirConfig)
    gmed: GmedConfig = field(default_factory=GmedConfig)
    clser: ClsErConfig = field(default_factory=ClsErConfig)
    esmer: EsmerConfig = field(default_factory=EsmerConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # method.md §5.3: Adam, constant LR, one optimiser for the whole stream
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 5e-7  # L2-style, on weights with ndim > 1 only
    # CUDA autocast: fp16 + GradScaler as the authors (pretrain.py:88, utils/amp.py) | bf16 (no scaler) | auto (bf16
    # where supported, else fp16) | none (fp32); the CPU always runs fp32. method.md §9.3 "AMP"
    amp: str = "fp16"
    micro_batch_size: int | None = None  # per-rank micro batch for gradient accumulation; None = whole batch


@dataclass
class TrainConfig:
    epochs: int = 10  # per task (VGGSound 10, AudioSet 15)
    batch_size: int = 48  # global batch of current clips (method.md §5.3: 12 per GPU x 4)
    seed: int = 2021
    log_every: int = 10  # steps between metrics.jsonl lines
    log_to: str = "none"  # none | tensorboard | wandb: the same scalars live in RUN/tensorboard/ or RUN/wandb/ too
    checkpoint_every: int = 0  # steps between 'latest' checkpoints inside a task; 0 = only at task ends
    checkpoint_minutes: float = 10.0  # also a 'latest' checkpoint once this many minutes passed (the authors'
    # save_freq_mints = 10); 0 = off. Either way a crash loses at most this much work.
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class HeadConfig:
    """A downstream head trained on the frozen backbone by `stella eval` (method.md §6.3); these defaults are the
    classification probe's (15 epochs, AdamW 5e-4, warm-up 2, batch 48). AdamW, `warmup_epochs` of linear warm-up
    then cosine to 0, stepped per batch."""

    root: str = ""  # prepared data of the task (`stella prep ...`); "" = data.root (the synthetic analogue)
    epochs: int = 15
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 5e-6
    warmup_epochs: int = 2
    batch_size: int = 48
    freqm: int = 48  # SpecAugment frequency mask width (classification only)
    timem: int = 192  # SpecAugment time mask width (classification only)
    test_clips: int = 4  # clips per test video, softmax averaged (classification only)
    channels: int = 256  # width of the mask decoder (avs only; the authors' ASPP has 256)
    # which epoch's head is tested: "last" (ours: no model selection on the test set) or "best_test" (the authors'
    # run.py: score the test split every `eval_every` epochs and after the last, keep the best epoch's head)
    select_epoch: str = "last"
    eval_every: int = 1  # the authors' logging.eval_freq (1 for VGGSound and AVE, 2 for AVS); only for best_test


@dataclass
class AVEHeadConfig(HeadConfig):
    """AVE (method.md §6.3): AdamW 1e-3, 15 epochs, batch 12, warm-up 2."""

    lr: float = 1e-3
    batch_size: int = 12
    # where segment s's one second of audio starts: "authors" = int(linspace(0, len - 1.1 s, S)[s]) samples (their
    # ave.py; the last of 10 starts at 8.9 s), "seconds" = s seconds (the benchmark's segment s = [s, s+1))
    audio_starts: str = "authors"
    train_crop: bool = False  # the authors' multi-scale crop on training segments (features recomputed each epoch)


@dataclass
class AVSHeadConfig(HeadConfig):
    """AVSBench S4 (method.md §6.3): AdamW 5e-4, 20 epochs, batch 48, warm-up 3."""

    epochs: int = 20
    warmup_epochs: int = 3
    eval_every: int = 2
    test_batch: int = 4  # videos per batch of AVSBench's test.sh: mIoU and F are per batch, F at its best threshold


@dataclass
class TransferConfig:
    """MSR-VTT-style transfer (method.md §6.3): more MAE + contrastive epochs on a new domain, then zero-shot
    retrieval."""

    root: str = ""  # `stella prep msrvtt` output; "" on the synthetic benchmark = its held-out domain (DATA/heldout)
    epochs: int = 15
    tasks: list[str] = field(default_factory=list)  # tasks of that folder to use; empty = all (synthetic: task2)


@dataclass
class EvalConfig:
    retrieval: bool = True  # zero-shot A<->V retrieval after every task (method.md §6.1)
    batch_size: int = 32
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    seed: int = 0  # head initialisation and data order of the downstream heads
    classification: HeadConfig = field(default_factory=HeadConfig)  # method.md §6.3 (VGGSound probe)
    ave: AVEHeadConfig = field(default_factory=AVEHeadConfig)
    avs: AVSHeadConfig = field(default_factory=AVSHeadConfig)
    msrvtt: TransferConfig = field(default_factory=TransferConfig)


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
# method.stella.selection: STELLA and its patch-selection ablations (baselines.md §2.13), in the report's row order
SELECTIONS = ("full", "random", "importance", "correlation")
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("synthetic", "vggsound", "audioset"),
    "model.preset": tuple(MODEL_PRESETS),
    "method.stella.selection": SELECTIONS,
    "optim.amp": ("auto", "bf16", "fp16", "none"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.log_to": ("none", "tensorboard", "wandb"),
    "eval.classification.select_epoch": ("last", "best_test"),
    "eval.ave.select_epoch": ("last", "best_test"),
    "eval.avs.select_epoch": ("last", "best_test"),
    "eval.ave.audio_starts": ("authors", "seconds"),
}


# ----------------------------------------------------------------------------------------------------------
# loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (a file, or a shipped recipe's name: find_recipe), following `extends:`; apply
    `key.sub=value` overrides, validate, fill the preset."""
    return recipe_from_dict(_read_with_extends(find_recipe(path), seen=()), source=str(path), overrides=overrides)


def shipped_recipes() -> Path:
    """The recipes that ship with the package, as a model zoo ships its configs: stella_cli/recipes in an installed
    wheel (pyproject.toml maps the repository's recipes/ there), the repository's recipes/ in a clone."""
    here = Path(__file__).resolve().parent
    installed = here / "recipes"
    return installed if installed.is_dir() else here.parent / "recipes"


def find_recipe(name: str | Path) -> Path:
    """The file a recipe argument names. An existing path is itself; otherwise `NAME`, `NAME.yaml` and
    `recipes/NAME.yaml` (README's commands, run outside a clone) are the shipped recipe NAME. Not found: one line
    with the closest shipped names."""
    path = Path(name)
    if path.is_file():
        return path
    if len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "recipes"):
        stem = path.name.removesuffix(".yaml")
        shipped = shipped_recipes() / f"{stem}.yaml"
        if shipped.is_file():
            return shipped
        names = sorted(p.stem for p in shipped_recipes().glob("*.yaml"))
        close = difflib.get_close_matches(stem, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"the shipped ones are {', '.join(names)}"
        raise RecipeError(f"{name}: no such recipe file, nor a shipped recipe {stem!r}; {hint} "
                          f"(shipped recipes: {shipped_recipes()})")
    raise RecipeError(f"{path}: recipe file not found")


def resolve_preset(recipe: Recipe) -> Recipe:
    """The recipe with its model sizes filled from `model.preset` (see resolve_model_preset)."""
    return dataclasses.replace(recipe, model=resolve_model_preset(recipe.model))


def resolve_model_preset(model: ModelConfig) -> ModelConfig:
    """Fill every size field left at None, model.avm.num_heads included, from `model.preset` (explicit values win)."""
    preset = MODEL_PRESETS[model.preset]
    avm = model.avm
    if avm.num_heads is None:
        avm = dataclasses.replace(avm, num_heads=AVM_PRESET_HEADS[model.preset])
    return dataclasses.replace(model, avm=avm, **{k: v for k, v in preset.items() if getattr(model, k) is None})


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>",
                     overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from a nested dict (a YAML file's, or `recipe_to_dict` output such as a run's saved config) with
    `key.sub=value` overrides applied, validated, its preset filled."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = _parse_override(item)
        _set_path(raw, key.split("."), value, source=f"--set {item}")
    recipe = _build(Recipe, raw, prefix="", source=source)
    _check_required_and_choices(recipe, source=source)
    return check_values(resolve_preset(recipe), source=source)


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


# every numeric key with its allowed range, checked when a recipe is loaded, so a run that would fail (or train
# nothing) fails before its first step, naming the key
POSITIVE_INTS = ("data.num_frames", "data.frame_stride", "data.image_size", "data.target_length", "data.num_mel_bins",
                 "model.embed_dim", "model.num_heads", "model.modality_depth", "model.fusion_depth",
                 "model.decoder_embed_dim", "model.decoder_depth", "model.decoder_num_heads", "model.patch_size",
                 "model.avm.num_heads",
                 "method.stella.num_core_audio_times", "method.replay_batch_size", "optim.micro_batch_size",
                 "train.epochs", "train.batch_size", "train.log_every", "eval.batch_size",
                 "eval.classification.eval_every", "eval.ave.eval_every", "eval.avs.eval_every", "eval.avs.test_batch")
NON_NEGATIVE = ("data.num_workers", "method.memory_size", "method.alpha", "method.stella.matching_loss_weight",
                "model.contrast_weight", "model.mae_weight", "optim.weight_decay", "train.checkpoint_every",
                "train.checkpoint_minutes")
POSITIVE_FLOATS = ("model.mlp_ratio", "model.contrast_tau", "method.stella.att_temperature", "optim.lr",
                   "data.fbank_std")
UNIT_INTERVAL_OPEN = ("model.mask_ratio_v", "model.mask_ratio_a", "method.stella.core_video_ratio",
                      "method.stella.core_audio_ratio")  # [0, 1): some tokens must stay


def check_values(recipe: Recipe, source: str) -> Recipe:
    """Refuse values no run can use (sizes, counts, ratios, rates); the message names the key and the range."""
    def bad(key: str, value: Any, want: str) -> RecipeError:
        return RecipeError(f"{source}: {key}: {value!r} {want}")

    for key in POSITIVE_INTS:
        value = get_path(recipe, key)
        if value is not None and value < 1:
            raise bad(key, value, "must be at least 1")
    for key in NON_NEGATIVE:
        value = get_path(recipe, key)
        if not value >= 0:  # also NaN
            raise bad(key, value, "must be >= 0")
    for key in POSITIVE_FLOATS:
        value = get_path(recipe, key)
        if not 0 < value < float("inf"):
            raise bad(key, value, "must be a finite number > 0")
    for key in UNIT_INTERVAL_OPEN:
        value = get_path(recipe, key)
        if not 0 <= value < 1:
            raise bad(key, value, "must be in [0, 1)")
    if len(recipe.optim.betas) != 2 or not all(0 <= b < 1 for b in recipe.optim.betas):
        raise bad("optim.betas", recipe.optim.betas, "must be two numbers in [0, 1)")
    if not recipe.eval.recall_at or min(recipe.eval.recall_at) < 1:
        raise bad("eval.recall_at", recipe.eval.recall_at, "must be a non-empty list of K >= 1")
    m = recipe.model
    if m.embed_dim % m.num_heads:
        raise bad("model.embed_dim", m.embed_dim, f"must be divisible by model.num_heads={m.num_heads}")
    if m.embed_dim % m.avm.num_heads:
        raise bad("model.avm.num_heads", m.avm.num_heads, f"must divide model.embed_dim={m.embed_dim} (e.g. "
                  f"model.avm.num_heads={m.num_heads}, the backbone's)")
    if m.decoder_embed_dim % m.decoder_num_heads:
        raise bad("model.decoder_embed_dim", m.decoder_embed_dim,
                  f"must be divisible by model.decoder_num_heads={m.decoder_num_heads}")
    for key in ("data.image_size", "data.target_length", "data.num_mel_bins"):
        if get_path(recipe, key) % m.patch_size:
            raise bad(key, get_path(recipe, key), f"must be a multiple of model.patch_size={m.patch_size}")
    return recipe


def get_path(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------------------
# derived values (never stored back into the recipe)


def per_rank_batch(train: TrainConfig, world_size: int) -> int:
    """method.md §9.3 B13: the global batch is split over ranks (48 / 4 GPUs = 12 per GPU)."""
    if train.batch_size % world_size:
        raise RecipeError(f"train.batch_size={train.batch_size} is not divisible by world size {world_size}")
    return train.batch_size // world_size


def per_rank_memory(method: MethodConfig, world_size: int) -> int:
    """method.md §3.9: each rank keeps an independent reservoir of memory_size // world_size slots."""
    return method.memory_size // world_size


def token_counts(num_frames: int, image_size: int, target_length: int, num_mel_bins: int,
                 patch_size: int) -> tuple[int, int]:
    """(L_V, L_A): F·(S/p)² video tokens and (T/p)·(M/p) audio tokens; (784, 512) for the paper's inputs."""
    return num_frames * (image_size // patch_size) ** 2, (target_length // patch_size) * (num_mel_bins // patch_size)


def num_core_tokens(num_tokens: int, core_ratio: float) -> int:
    """K = int(L * (1 - core_ratio)); 784 -> 392 and 512 -> 256 at the default 0.5 (method.md §3.7)."""
    return int(num_tokens * (1 - core_ratio))
