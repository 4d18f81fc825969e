"""The table of methods (name -> class, the paper's row, schedule) and building one from a recipe.

`METHODS` is the only list of method names: recipes are checked against it (`check_method`), `stella report`
orders and names its rows by it, `stella reproduce` and `stella bench` take their method lists from it. Adding a
method is one line here (README "Adding a method"). Rows are in the order of the paper's tables (docs/protocol.md
"Tables").
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

import torch

from stella_cli.baselines import ER, ClsEr, DERpp, Esmer, Gmed, Lump, Mir
from stella_cli.checkpoint import load_authors_checkpoint
from stella_cli.config import RANDOM, Recipe, RecipeError, per_rank_batch, per_rank_memory
from stella_cli.errors import StellaError
from stella_cli.methods import Finetune, Method, Multitask, Replay
from stella_cli.model import CAVMAE
from stella_cli.stella import AVMPretrain, Stella, StellaPlus


@dataclass(frozen=True)
class MethodEntry:
    cls: type[Method]
    row: str | None  # its row name in the paper's tables; None: not a compared method (an initialisation step)
    union: bool = False  # trained once on the union of the tasks' clips, not task by task


METHODS: dict[str, MethodEntry] = {
    "multitask": MethodEntry(Multitask, "Multitask", union=True),  # the upper bound: every task at once
    "finetune": MethodEntry(Finetune, "Finetune"),
    "er": MethodEntry(ER, "ER"),
    "mir": MethodEntry(Mir, "MIR"),
    "derpp": MethodEntry(DERpp, "DER++"),
    "gmed": MethodEntry(Gmed, "GMED"),
    "clser": MethodEntry(ClsEr, "CLS-ER"),
    "esmer": MethodEntry(Esmer, "ESMER"),
    "lump": MethodEntry(Lump, "LUMP"),
    "stella": MethodEntry(Stella, "STELLA"),
    "stella+": MethodEntry(StellaPlus, "STELLA+"),
    "avm_pretrain": MethodEntry(AVMPretrain, None, union=True),  # initialisation chain: the AVM on a frozen backbone
}
PAPER_METHODS = tuple(name for name, entry in METHODS.items() if entry.row)  # the rows of the paper's tables
REPLAY_METHODS = tuple(name for name in PAPER_METHODS if issubclass(METHODS[name].cls, Replay))  # with a memory


def recipe_suffix(name: str) -> str:
    """The method's part of a recipe file name: recipes/<stream>_<suffix>.yaml (stella+ -> stella_plus)."""
    return name.replace("+", "_plus")


def check_method(recipe: Recipe, source: str) -> None:
    """method.name must be a key of METHODS (with a close match suggested), and STELLA needs a memory."""
    name = recipe.method.name
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{source}: method.name: {name!r} is not one of {', '.join(METHODS)}{hint}")
    if issubclass(METHODS[name].cls, Stella) and recipe.method.memory_size < 1:
        raise RecipeError(f"{source}: method.memory_size: {recipe.method.memory_size!r} must be at least 1 for {name}")


def check_initial_checkpoint(recipe: Recipe, source: str) -> None:
    """A recipe that starts from a checkpoint (the paper's streams, the chain's later steps) must have it before a
    fresh run starts: model.checkpoint names a file that exists, or is "random" (random weights on purpose). Checked
    before any data is read; a resumed run takes its weights from its own checkpoint and needs none."""
    m = recipe.model
    made_by = f" (made by {m.checkpoint_made_by})" if m.checkpoint_made_by else ""
    choices = (f"pass --set model.checkpoint=PATH, or --set model.checkpoint={RANDOM} to start from random weights on "
               f"purpose")
    if m.checkpoint == RANDOM:
        return
    if not m.checkpoint and m.checkpoint_made_by:
        raise RecipeError(f"{source}: model.checkpoint is empty, but this recipe starts from a pre-trained "
                          f"backbone{made_by}; {choices}")
    if m.checkpoint and not Path(m.checkpoint).is_file():
        raise RecipeError(f"{source}: model.checkpoint: {m.checkpoint} not found{made_by}; {choices}")


def build_method(recipe: Recipe, rank: int, world: int, device: torch.device, *,
                 initial_weights: bool = True) -> Method:
    """The recipe's method on `device`: the backbone (random, or model.checkpoint), and the method around it.

    initial_weights=False (a resumed run, whose checkpoint holds every weight) skips reading model.checkpoint and
    model.avm.checkpoint."""
    check_method(recipe, "the recipe")
    d, entry = recipe.data, METHODS[recipe.method.name]
    if entry.cls is AVMPretrain and recipe.model.checkpoint in ("", RANDOM):
        raise RecipeError("method.name=avm_pretrain trains the AVM on a frozen backbone: set model.checkpoint to "
                          "a pre-trained one")
    torch.manual_seed(recipe.train.seed)  # parameter init is the one use of the global RNG
    backbone = CAVMAE(recipe.model, d.num_frames, d.image_size, d.target_length, d.num_mel_bins)
    avm_cfg = recipe.model.avm
    if not initial_weights:
        avm_cfg = dataclasses.replace(avm_cfg, checkpoint="")
    elif recipe.model.checkpoint not in ("", RANDOM):
        try:
            load_authors_checkpoint(backbone, recipe.model.checkpoint)
        except StellaError as err:
            raise StellaError(f"model.checkpoint: {err}") from err
    method = entry.cls(
        backbone, recipe.method, avm_cfg=avm_cfg, batch_size=per_rank_batch(recipe.train, world),
        memory_per_rank=per_rank_memory(recipe.method, world), seed=recipe.train.seed, rank=rank, device=device)
    return method.to(device)
