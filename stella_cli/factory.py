"""The table of methods (name -> class, the paper's row, schedule) and building one from a recipe.

`METHODS` is the only list of method names: recipes are checked against it (`check_method`), `stella report`
orders and names its rows by it, `stella reproduce` and `stella bench` take their method lists from it. Adding a
method is one line here (README "Adding a method"). Rows are in the order of the paper's tables (docs/protocol.md
"Tables").
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from stella_cli.baselines import ER, ClsEr, DERpp, Esmer, Gmed, Lump, Mir
from stella_cli.checkpoint import load_authors_checkpoint
from stella_cli.config import Recipe, RecipeError, per_rank_batch, per_rank_memory
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


def build_method(recipe: Recipe, rank: int, world: int, device: torch.device) -> Method:
    """The recipe's method on `device`: the backbone (random, or model.checkpoint), and the method around it."""
    check_method(recipe, "the recipe")
    d, entry = recipe.data, METHODS[recipe.method.name]
    if entry.cls is AVMPretrain and not recipe.model.checkpoint:
        raise ValueError("method.name=avm_pretrain trains the AVM on a frozen backbone: set model.checkpoint")
    torch.manual_seed(recipe.train.seed)  # parameter init is the one use of the global RNG
    backbone = CAVMAE(recipe.model, d.num_frames, d.image_size, d.target_length, d.num_mel_bins)
    if recipe.model.checkpoint:
        try:
            load_authors_checkpoint(backbone, recipe.model.checkpoint)
        except FileNotFoundError as err:  # a start point not made yet: say how (README "Initialisation chain")
            raise StellaError(f"model.checkpoint: {err}; make the start point first (the synthetic recipes': "
                              "`stella reproduce synthetic-init`), or set model.checkpoint= for random weights") from err
        except ValueError as err:
            raise StellaError(f"model.checkpoint: {err}") from err
    method = entry.cls(
        backbone, recipe.method, avm_cfg=recipe.model.avm, batch_size=per_rank_batch(recipe.train, world),
        memory_per_rank=per_rank_memory(recipe.method, world), seed=recipe.train.seed, rank=rank, device=device)
    return method.to(device)
