"""Every checkpoint file stella reads or writes: run checkpoints, the authors' weights, the ImageNet MAE start.

A run checkpoint is the flat dict train.Trainer.state() builds: {"model": backbone state dict, "method": the
method's other weights (e.g. `avm.*`), "method_extra": buffers and generator states, "optimizer", "scaler",
"position", "world_size", "recipe"}, written atomically (temp file + rename) as RUN/checkpoints/latest.pt and
taskNN_<task>.pt at task ends. Reading one back refuses, in one line naming the file and what to do, whatever can
go wrong outside the program: a copy cut short, a 0-byte file from a full disk, another file under the name, a
checkpoint of another model size or method.

The authors' checkpoints use their module names (`module.`, `backbone.transformer.`, `avmatching_module.`,
`vacls_classifier.`); `load_authors_checkpoint` maps them, and ours, onto our modules with a shape check per tensor
(nanoGPT's from_pretrained). The initialisation chain (method.md §1.9, §2.5) starts from an ImageNet MAE:
`convert_mae` maps it into the two-stream layout, sized for the recipe that will load it.

ImageNet MAE  --stella convert mae-->  init.pth  --recipes/init_audioset20k.yaml-->  AudioSet-20K backbone
  --recipes/init_avm_vggsound.yaml-->  AVM for the VGGSound stream.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from stella_cli.config import ModelConfig, Recipe
from stella_cli.errors import CheckpointError, StellaError
from stella_cli.files import replacing, write_failures
from stella_cli.model import AVM, CAVMAE, Classifier

TASK_CHECKPOINT = re.compile(r"task(\d+)_(.+)\.pt")  # RUN/checkpoints/taskNN_<task>.pt, NN counted from 01
LATEST = "latest.pt"
METHOD_AVM_PREFIX = "avm."  # the AVM's keys in a run checkpoint's "method" dict


# ----------------------------------------------------------------------------------------------------------
# run checkpoints: names


def task_checkpoint_name(number: int, task: str) -> str:
    """The checkpoint written after the `number`-th task of the stream (1-based): taskNN_<task>.pt."""
    return f"task{number:02d}_{task}.pt"


def task_of(path: Path) -> str:
    """The task a checkpoint was written after (taskNN_<task>.pt -> <task>); the file stem for any other name."""
    m = TASK_CHECKPOINT.fullmatch(Path(path).name)
    return m.group(2) if m else Path(path).stem


def task_checkpoints(run_dir: Path) -> list[Path]:
    """taskNN_<task>.pt of a run, in stream order."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("task*.pt") if TASK_CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(TASK_CHECKPOINT.fullmatch(p.name).group(1)))


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint of a run directory (temp files of a killed save do not count)."""
    return sorted((Path(run_dir) / "checkpoints").glob("*.pt"))


def latest_run(runs_root: Path = Path("runs")) -> Path:
    """The run directory under runs/ whose newest checkpoint is the most recent."""
    runs = [d for d in runs_root.glob("*") if (d / "config.yaml").is_file() and run_checkpoints(d)]
    if not runs:
        raise CheckpointError(f"{runs_root}/: no run with checkpoints; train one (`stella train RECIPE`) or give a "
                              "run directory or checkpoint")
    return max(runs, key=lambda d: max(p.stat().st_mtime for p in run_checkpoints(d)))


def pick_checkpoint(run_dir: Path, checkpoint: str | None) -> tuple[list[Path], Path]:
    """(task checkpoints up to the chosen one, the chosen one); `checkpoint` is taskNN, a file name, or None = last."""
    tasks = task_checkpoints(run_dir)
    if checkpoint is None:
        if tasks:
            return tasks, tasks[-1]
        latest = run_dir / "checkpoints" / LATEST
        if latest.is_file():
            return [latest], latest
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint (has the run finished a task?)")
    for i, p in enumerate(tasks):
        if p.name == checkpoint or p.name.startswith(checkpoint + "_") or p.stem == checkpoint:
            return tasks[: i + 1], p
    path = run_dir / "checkpoints" / checkpoint
    if path.is_file():
        return [path], path
    names = ", ".join(p.name for p in tasks) or "none"
    raise CheckpointError(f"--checkpoint {checkpoint}: not in {run_dir / 'checkpoints'} (task checkpoints: {names})")


# ----------------------------------------------------------------------------------------------------------
# the one reader of torch files


SAFE_CONTENT = "tensors, numbers, strings, lists and dicts"  # all that torch.load builds with weights_only=True


def read_torch_file(path: Path, *, mmap: bool = False) -> Any:
    """The object in a torch file: the only torch.load of stella, for every file it reads (run checkpoints, state
    dicts, the authors' weights, an ImageNet MAE). weights_only=True builds tensors, numbers, strings, lists and dicts
    and nothing else, so reading a file never runs code: a pickle that names any other object (a class, a function
    such as os.system) is refused, before anything is built, with a CheckpointError naming what it needs.
    Other failures (a truncated or foreign file) are raised as torch raises them.
    mmap: map the tensors instead of reading them (to look at one part of many checkpoints)."""
    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol that it then refuses anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        needs = unsafe_globals(path, str(err))
        if not needs:  # an opcode torch.save never writes: random bytes, a pickle of another program
            raise pickle.UnpicklingError(f"not a torch.save file of {SAFE_CONTENT}") from err
        raise CheckpointError(f"{path}: refused, nothing in it was run: loading it needs {', '.join(needs)}, but "
                              f"stella reads only {SAFE_CONTENT} (torch.load weights_only=True); if you trust where "
                              f"it came from, save its weights as a plain state dict (README: Security)") from None


def unsafe_globals(path: Path, message: str) -> list[str]:
    """What a torch file needs beyond the weights_only loader (e.g. ['posix.system']), found without unpickling:
    torch lists them for its zip format; for the legacy format its refusal names the first."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not the zip format: torch says "... GLOBAL posix.system ..."
        return re.findall(r"GLOBAL ([\w.]+)", message)[:1]


# ----------------------------------------------------------------------------------------------------------
# run checkpoints: writing and reading


def write_checkpoint(path: Path, state: dict[str, Any], *, also: tuple[str, ...] = ()) -> None:
    """Write `state` to `path` through a temp file + fsync + rename (files.replacing), so neither a crash nor a full
    disk leaves a half-written checkpoint: a failed write removes the temp file, leaves the previous checkpoint as it
    was and is one WriteFailed line. Each name in `also` (beside `path`) becomes a hard link to it (a copy where the
    file system has none), also put in place atomically."""
    with replacing(path, sync=True) as fh:
        torch.save(state, fh)
    for name in also:
        tmp = path.with_name(name + ".tmp")
        with write_failures(path.with_name(name), partial=tmp):
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, path.with_name(name))


CHECKPOINT_KEYS = ("model", "method", "method_extra", "optimizer", "scaler", "position", "world_size", "recipe")


def earlier_checkpoints(path: Path) -> list[Path]:
    """The other checkpoints next to `path`, newest task first (the candidates to resume from instead)."""
    if not path.parent.is_dir():
        return []
    return sorted((p for p in path.parent.glob("task*.pt") if not (path.exists() and p.samefile(path))), reverse=True)


def what_to_do(path: Path) -> str:
    if path.parent.name != "checkpoints":  # not a run's checkpoint: the authors' weights, a converted MAE
        return "restore the file from a copy, or download or convert it again"
    others = [p for p in earlier_checkpoints(path) if p.stat().st_size > 0]
    if path.name == "latest.pt" and others:
        return (f"copy an earlier one over it (cp {others[0]} {path}) and resume, or start a new output.dir "
                f"(--set output.dir=...)")
    return "start a new output.dir (--set output.dir=...), or restore the file from a copy"


def load_file(path: Path, *, mmap: bool = False) -> Any:
    """read_torch_file of an existing file; an empty (0-byte) or unreadable one (truncated by a full disk or a cut
    copy, damaged, not a torch file) is the same CheckpointError for every reader: `stella train --resume`, `stella
    eval`, `model.checkpoint`, `stella convert`; one that would run code is refused by read_torch_file.
    mmap: map the tensors instead of reading them."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; {what_to_do(path)}")
    try:
        return read_torch_file(path, mmap=mmap)
    except CheckpointError:  # refused: it would run code
        raise
    except Exception as err:  # truncated zip, a text file, a pickle of something else: torch raises many types
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0][:120] if text else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read ({size:,} bytes; truncated or damaged: {reason}); "
                              f"{what_to_do(path)}") from err


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read a `stella train` checkpoint (read_torch_file); a missing, empty, truncated or foreign file, or one that
    would run code, is a CheckpointError. mmap: see read_torch_file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    state = load_file(path, mmap=mmap)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a `stella train` checkpoint (no {', '.join(missing)}); "
                              f"{what_to_do(path)}")
    return state


def check_compatible(state: dict[str, Any], path: Path, *, method_name: str, method: nn.Module) -> None:
    """Refuse a checkpoint of another method or another model shape than the run's recipe builds."""
    saved_method = state["recipe"].get("method", {}).get("name")
    if saved_method != method_name:
        raise CheckpointError(f"{path}: saved by method {saved_method!r}, but the recipe trains {method_name!r}; "
                              f"resume with method.name={saved_method}, or start a new output.dir")
    own = {f"backbone.{k}": v for k, v in state["model"].items()} | dict(state["method"])
    expected = method.state_dict()
    for key in sorted(set(own) | set(expected)):
        if key not in own or key not in expected or own[key].shape != expected[key].shape:
            saved = tuple(own[key].shape) if key in own else "absent"
            built = tuple(expected[key].shape) if key in expected else "absent"
            size = state["recipe"].get("model", {}).get("preset")
            raise CheckpointError(f"{path}: another model shape than the recipe's ({key}: saved {saved}, recipe "
                                  f"{built}; saved with model.preset={size}); resume with the run's own "
                                  f"config.yaml, or start a new output.dir")


@dataclass
class Loaded:
    """A checkpoint's backbone (eval mode, no gradients, on the device) and, for a run checkpoint, the method's
    other weights (e.g. the AVM) and the optimiser step it was saved at."""

    backbone: CAVMAE
    method_state: dict[str, Tensor]  # empty for a bare state dict
    step: int | None

    def avm_state(self) -> dict[str, Tensor]:
        """The AVM's state dict, {} when the method has no AVM."""
        return {k.removeprefix(METHOD_AVM_PREFIX): v for k, v in self.method_state.items()
                if k.startswith(METHOD_AVM_PREFIX)}


def read_any(path: Path) -> Any:
    """The object in a torch file (a run checkpoint, a state dict, the authors' weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    return load_file(path)


def load_backbone(path: Path, recipe: Recipe, device: torch.device) -> Loaded:
    """Build the recipe's backbone and load `path`: a run checkpoint ({"model", "method", ...}) or, through the
    key mapping of load_authors_checkpoint, the authors' state dict."""
    d = recipe.data
    backbone = CAVMAE(recipe.model, d.num_frames, d.image_size, d.target_length, d.num_mel_bins)
    state = read_any(path)
    if is_run_checkpoint(state):
        backbone.load_state_dict(state["model"])
        loaded = Loaded(backbone, dict(state["method"]), state.get("position", {}).get("step"))
    else:
        load_authors_checkpoint(backbone, state if isinstance(state, dict) else path)
        loaded = Loaded(backbone, {}, None)
    loaded.backbone.to(device).eval().requires_grad_(False)
    return loaded


# ----------------------------------------------------------------------------------------------------------
# the authors' key layout


AUTHORS_PREFIXES = ("module.", "backbone.transformer.")  # stripped in this order (model_module.py:37-41)
AVM_PREFIX = "avmatching_module."
OTHER_MODULES = {AVM_PREFIX: AVM, "vacls_classifier.": Classifier}  # keys owned by the other modules


def is_run_checkpoint(sd: Any) -> bool:
    """A `stella train` checkpoint (runs/NAME/checkpoints/latest.pt, taskNN_*.pt): {"model", "method", ...}."""
    return isinstance(sd, Mapping) and isinstance(sd.get("model"), Mapping) and isinstance(sd.get("method"), Mapping)


def authors_layout(sd: Mapping[str, Any]) -> dict[str, Any]:
    """One flat state dict in the authors' layout from any checkpoint we read.

    A `stella train` checkpoint gives its backbone ("model") plus its AVM ("method" keys `avm.*`) as
    `avmatching_module.*`, as the authors' wrapper names it (the method's other state, e.g. teachers, is left out);
    {"model": state_dict} gives the state dict; anything else is returned as is.
    """
    if is_run_checkpoint(sd):
        avm = {f"{AVM_PREFIX}{k.removeprefix(METHOD_AVM_PREFIX)}": v for k, v in sd["method"].items()
               if k.startswith(METHOD_AVM_PREFIX)}
        return {**sd["model"], **avm}
    if isinstance(sd.get("model"), Mapping):
        return dict(sd["model"])
    return dict(sd)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A checkpoint (read_torch_file) in the authors' layout (see authors_layout)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    sd = load_file(path)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, {{'model': state_dict}} or a `stella train` checkpoint, "
                              f"got {type(sd).__name__}")
    return authors_layout(sd)


def load_authors_checkpoint(model: nn.Module, source: str | Path | Mapping[str, Tensor],
                            strict: bool = True) -> dict[str, Any]:
    """Load the authors' state dict (or ours) into a CAVMAE, AVM or Classifier, like nanoGPT's from_pretrained.

    source: a file or a mapping: the authors' checkpoint, a plain / {"model": ...} state dict (`stella convert mae`
    output), or a `stella train` checkpoint (backbone from "model", AVM from the "method" keys `avm.*`).
    Prefixes `module.` and `backbone.transformer.` are stripped; for an AVM the keys under `avmatching_module.`
    are taken, for a Classifier those under `vacls_classifier.` (if present), for the backbone every other key.
    Each tensor's shape is checked.  strict: missing or unexpected keys raise CheckpointError.
    Returns {"loaded": n, "missing": [...], "unexpected": [...], "skipped": n keys of other modules}.
    """
    where = str(source) if isinstance(source, (str, Path)) else "state dict"
    sd = read_state_dict(source) if isinstance(source, (str, Path)) else authors_layout(source)
    clean = {}
    for key, value in sd.items():
        for prefix in AUTHORS_PREFIXES:
            key = key.removeprefix(prefix)
        clean[key] = value
    own = next((p for p, cls in OTHER_MODULES.items() if isinstance(model, cls)), None)
    if own is not None and any(k.startswith(own) for k in clean):
        picked = {k.removeprefix(own): v for k, v in clean.items() if k.startswith(own)}
    elif own is not None and "patch_embed_v.proj.weight" in clean:
        raise CheckpointError(f"{where}: holds a backbone but no {own}* keys, so no {type(model).__name__} weights "
                              f"(e.g. a `stella train` run of a method without one)")
    elif own is not None:
        picked = clean
    else:
        picked = {k: v for k, v in clean.items() if not k.startswith(tuple(OTHER_MODULES))}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(picked))
    unexpected = sorted(set(picked) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{where}: {len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys "
                              f"{unexpected[:8]} for {type(model).__name__}")
    for key in set(picked) & set(expected):
        if tuple(picked[key].shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(picked[key].shape)}, the model expects "
                                  f"{tuple(expected[key].shape)}")
    model.load_state_dict({k: v for k, v in picked.items() if k in expected}, strict=False)
    return {"loaded": len(set(picked) & set(expected)), "missing": missing, "unexpected": unexpected,
            "skipped": len(clean) - len(picked)}


def load_avm_checkpoint(avm: AVM, source: str | Path | Mapping[str, Tensor], strict: bool = True) -> dict[str, Any]:
    """method.md §2.5: AVM weights from a Finetune_submodule / STELLA checkpoint (`module.avmatching_module.*`) or a
    `stella train` checkpoint of a method with an AVM (avm_pretrain, stella, stella+)."""
    return load_authors_checkpoint(avm, source, strict)


# ----------------------------------------------------------------------------------------------------------
# ImageNet MAE -> the two-stream layout (`stella convert mae`)


# tensors tools/adapt_imae_weights_to_vamae.py never assigns: its CAV constructor leaves them at zero
MAE_UNMAPPED = ("pos_embed_a", "inter_pos_embed_a", "decoder_pos_embed_a", "modality_a", "modality_v",
                "decoder_modality_a", "decoder_modality_v")


def mae_sizes(mae: Mapping[str, Tensor], where: str | Path = "MAE") -> dict[str, Any]:
    """The sizes an ImageNet MAE state dict fixes: embed_dim, depth, patch_size, image_size (square, from the
    pos-embed without cls), decoder_embed_dim, decoder_depth, mlp_ratio.  Heads are not in a state dict."""
    need = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight", "mask_token",
            "decoder_embed.weight", "decoder_pos_embed", "decoder_pred.weight", "decoder_norm.weight",
            "blocks.0.mlp.fc1.weight")
    for key in need:
        if key not in mae:
            raise CheckpointError(f"{where}: missing MAE key {key!r}")
    D, _, p, _ = mae["patch_embed.proj.weight"].shape
    return {"embed_dim": D, "depth": 1 + max(int(k.split(".")[1]) for k in mae if k.startswith("blocks.")),
            "patch_size": p, "image_size": math.isqrt(mae["pos_embed"].shape[1] - 1) * p,
            "decoder_embed_dim": mae["decoder_embed.weight"].shape[0],
            "decoder_depth": 1 + max(int(k.split(".")[1]) for k in mae if k.startswith("decoder_blocks.")),
            "mlp_ratio": mae["blocks.0.mlp.fc1.weight"].shape[0] / D}


def convert_mae(ckpt_path: str | Path, out_path: str | Path, *, num_frames: int = 4, target_length: int = 1024,
                num_mel_bins: int = 128, modality_depth: int = 10, faithful_zeros: bool = True) -> dict[str, Any]:
    """`stella convert mae`: an ImageNet MAE ViT checkpoint -> a CAVMAE state dict (method.md §1.9).

    MAE blocks 0..modality_depth-1 go to blocks_a and blocks_v, the rest to blocks_u (their norms also to the _a/_v
    sets); `norm` to norm, norm_a, norm_v; the image pos-embed (without cls) repeated per frame to pos_embed_v and
    inter_pos_embed_v, the decoder one to decoder_pos_embed_v; audio patch embedding = sum over RGB; audio head =
    first p² rows of decoder_pred; both mask tokens = mask_token; decoder_* copied.  Sizes come from the MAE.
    faithful_zeros: the tensors in MAE_UNMAPPED are zeros as in the authors' output; False keeps the model init.
    Writes a plain state dict with the authors' key names and returns a report.
    """
    mae = read_state_dict(ckpt_path)
    size = mae_sizes(mae, ckpt_path)
    D, p, depth, decoder_depth = size["embed_dim"], size["patch_size"], size["depth"], size["decoder_depth"]
    if not 0 < modality_depth < depth:
        raise StellaError(f"{ckpt_path}: modality_depth={modality_depth} must be in 1..{depth - 1} "
                          f"for a {depth}-block MAE")
    cfg = ModelConfig(embed_dim=D, num_heads=1, modality_depth=modality_depth, fusion_depth=depth - modality_depth,
                      decoder_embed_dim=size["decoder_embed_dim"], decoder_depth=decoder_depth,
                      decoder_num_heads=1, mlp_ratio=size["mlp_ratio"], patch_size=p)
    model = CAVMAE(cfg, num_frames, size["image_size"], target_length, num_mel_bins)
    out = {k: v.clone() for k, v in model.state_dict().items()}
    mapped = {}
    for key, value in mae.items():
        if key.startswith("blocks."):
            i, rest = int(key.split(".")[1]), key.split(".", 2)[2]
            if i < modality_depth:
                mapped[f"blocks_a.{i}.{rest}"] = mapped[f"blocks_v.{i}.{rest}"] = value
            else:
                mapped[f"blocks_u.{i - modality_depth}.{rest}"] = value
                if rest.startswith(("norm1.", "norm2.")):
                    for m in ("a", "v"):
                        mapped[f"blocks_u.{i - modality_depth}.{rest[:5]}_{m}.{rest[6:]}"] = value
        elif key.startswith(("decoder_embed.", "decoder_blocks.", "decoder_norm.")):
            mapped[key] = value
    for m in ("", "_a", "_v"):
        mapped[f"norm{m}.weight"], mapped[f"norm{m}.bias"] = mae["norm.weight"], mae["norm.bias"]
    mapped["pos_embed_v"] = mapped["inter_pos_embed_v"] = mae["pos_embed"][:, 1:].repeat(1, num_frames, 1)
    mapped["decoder_pos_embed_v"] = mae["decoder_pos_embed"][:, 1:].repeat(1, num_frames, 1)
    mapped["patch_embed_v.proj.weight"] = mae["patch_embed.proj.weight"]
    mapped["patch_embed_a.proj.weight"] = mae["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    mapped["patch_embed_v.proj.bias"] = mapped["patch_embed_a.proj.bias"] = mae["patch_embed.proj.bias"]
    mapped["mae_score_video.decoder.weight"] = mae["decoder_pred.weight"]
    mapped["mae_score_video.decoder.bias"] = mae["decoder_pred.bias"]
    mapped["mae_score_audio.decoder.weight"] = mae["decoder_pred.weight"][: p * p]
    mapped["mae_score_audio.decoder.bias"] = mae["decoder_pred.bias"][: p * p]
    mapped["mask_token_a"] = mapped["mask_token_v"] = mae["mask_token"]
    for key, value in mapped.items():
        if key not in out or tuple(value.shape) != tuple(out[key].shape):
            raise CheckpointError(f"{ckpt_path}: MAE tensor for {key} has shape {tuple(value.shape)}, expected "
                                  f"{tuple(out[key].shape) if key in out else 'no such key'}")
        out[key] = value.detach().clone().float()
    if faithful_zeros:
        for key in MAE_UNMAPPED:
            out[key].zero_()
    write_checkpoint(Path(out_path), out)
    return {"out": str(out_path), "mapped": len(mapped), "zeros": list(MAE_UNMAPPED) if faithful_zeros else [],
            "unmapped": sorted(set(out) - set(mapped)), "ignored": sorted(k for k in mae if k in ("cls_token",)),
            "sizes": {**size, "modality_depth": modality_depth}}


DEFAULT_INPUTS = {"num_frames": 4, "target_length": 1024, "num_mel_bins": 128, "modality_depth": 10}  # method.md §1.1


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
                raise StellaError(f"--{key.replace('_', '-')} {value} contradicts {recipe_name}: "
                                  f"{OPTION_KEYS[key]}={from_recipe[key]} (drop the option or change the recipe)")
        chosen = from_recipe
    else:
        chosen.update({k: v for k, v in options.items() if v is not None})
    if recipe is not None:  # before writing anything: the MAE's sizes must be the recipe's
        want = recipe_sizes(recipe)
        for key, value in mae_sizes(read_state_dict(checkpoint), checkpoint).items():
            if want[key] != value:
                raise StellaError(f"{checkpoint}: the MAE has {key} {value}, {recipe_name} sets {SIZE_KEYS[key]}="
                                  f"{want[key]}")
    report = convert_mae(checkpoint, out, faithful_zeros=faithful_zeros, **chosen)
    if recipe is not None:
        try:
            check_fits_recipe(report, recipe, recipe_name, checkpoint)
        except StellaError:
            Path(out).unlink(missing_ok=True)
            raise
    return report


def check_fits_recipe(report: dict[str, Any], recipe: Recipe, recipe_name: str, checkpoint: str | Path) -> None:
    """The converted state dict (report["out"]) has exactly the keys and shapes of the recipe's CAVMAE."""
    d = recipe.data
    with torch.device("meta"):  # shapes only: no memory, no init
        model = CAVMAE(recipe.model, d.num_frames, d.image_size, d.target_length, d.num_mel_bins)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in read_torch_file(report["out"]).items()}
    if got != expected:
        diff = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise CheckpointError(f"{checkpoint}: the converted weights do not fit {recipe_name}'s model: {len(diff)} keys "
                              f"differ, e.g. {diff[:4]}")
