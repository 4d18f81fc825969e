"""Reading a training checkpoint back: one line naming the file and what to do when it cannot be used.

A checkpoint is the flat dict train.Trainer.state() writes (atomically: temp file + rename). What can still go
wrong is outside the program: a copy cut short, a 0-byte file from a full disk, another file under the name, a
checkpoint of another model size or method. Each is refused here before any tensor is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stella_cli.errors import CheckpointError

CHECKPOINT_KEYS = ("model", "method", "method_extra", "optimizer", "scaler", "position", "world_size", "recipe")


def earlier_checkpoints(path: Path) -> list[Path]:
    """The other checkpoints next to `path`, newest task first (the candidates to resume from instead)."""
    if not path.parent.is_dir():
        return []
    return sorted((p for p in path.parent.glob("task*.pt") if not (path.exists() and p.samefile(path))), reverse=True)


def what_to_do(path: Path) -> str:
    others = [p for p in earlier_checkpoints(path) if p.stat().st_size > 0]
    if path.name == "latest.pt" and others:
        return (f"copy an earlier one over it (cp {others[0]} {path}) and resume, or start a new output.dir "
                f"(--set output.dir=...)")
    return "start a new output.dir (--set output.dir=...), or restore the file from a copy"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load a `stella train` checkpoint; a missing, empty, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; {what_to_do(path)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, a text file, a pickle of something else: torch raises many types
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0][:120] if text else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read ({size:,} bytes; truncated or damaged: {reason}); "
                              f"{what_to_do(path)}") from err
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
