"""What a model and one training step cost: `stella model` (sizes) and `stella bench` (time, memory per method).

`stella bench` lays the methods side by side, as the paper's efficiency table does.

Each method runs in its own fresh process (so its peak RSS is its own) on the same recipe: the paper's input sizes
(4×3×224×224 video, 1×1024×128 fbank), random clips, a buffer filled by real training steps before anything is
measured (so replaying methods replay), then `steps` timed iterations through the trainer's own `train_step`
(autocast, scaler, optimiser step), whatever the method does inside `Method.step`. Reported per method:
  * iter_s: median wall time of one iteration (CUDA synchronised);
  * activation_bytes: bytes of the distinct storages autograd saves for backward in one iteration, parameters and
    module buffers excluded (`torch.autograd.graph.saved_tensors_hooks`): a figure that does not depend on the
    allocator or the hardware, only on the dtype (fp32 on CPU, the AMP dtype on CUDA);
  * peak_bytes: CUDA max allocated over the timed iterations (everything: weights, Adam state, activations), or on
    CPU the growth of the process's peak RSS over its size before the first training step (gradients, Adam state,
    buffer contents, activations and temporaries; the interpreter and the weights are left out);
and each as a ratio to DER++'s row (to the first method's when DER++ is not measured).
`attention="math"` swaps `F.scaled_dot_product_attention` for the authors' explicit softmax(q·kᵀ)·v, which keeps
every attention map for backward (the quadratic term that STELLA's core patches shrink); SDPA never stores them.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stella_cli.config import (MODEL_PRESETS, DataConfig, MethodConfig, ModelConfig, Recipe, TrainConfig,
                               num_core_tokens, resolve_preset)
from stella_cli.distributed import amp_dtype, grad_scaler
from stella_cli.errors import StellaError
from stella_cli.factory import METHODS, PAPER_METHODS, build_method
from stella_cli.model import AVM, CAVMAE, Classifier
from stella_cli.replay import ReservoirBuffer
from stella_cli.train import Position, Trainer, build_optimizer

SIZES = dict(num_frames=4, image_size=224, target_length=1024, num_mel_bins=128)  # the paper's inputs
REFERENCE = "derpp"  # the paper's efficiency table compares with DER++
ATTENTIONS = ("sdpa", "math")
ROW_KEYS = ("method", "iter_s", "activation_bytes", "peak_bytes", "iter_ratio", "activation_ratio", "peak_ratio",
            "reference", "preset", "batch", "attention", "device")
_SDPA = F.scaled_dot_product_attention


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The authors' attention (cav.py:651-656): materialises softmax(q·kᵀ·scale), which autograd saves."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


@contextmanager
def attention_kernel(name: str) -> Iterator[None]:
    """Every `F.scaled_dot_product_attention` call in the block (backbone, decoder, AVM) uses kernel `name`."""
    if name not in ATTENTIONS:
        raise StellaError(f"--attention {name!r}: choose one of {', '.join(ATTENTIONS)}")
    F.scaled_dot_product_attention = math_attention if name == "math" else _SDPA
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the `with` block (`total`).

    Storages of `exclude` (parameters, module buffers) are not activations and are left out. Keyed by storage
    address: views of one storage (q, k, v of one qkv projection) count once.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------------------
# choosing methods


def all_methods() -> list[str]:
    """Every compared method once, in the paper's row order: Multitask is left out (the Finetune step, on the union
    of the tasks), and so is `avm_pretrain`, a step of the initialisation chain, not a compared method."""
    return [name for name in PAPER_METHODS if not METHODS[name].union]


def parse_methods(text: str) -> list[str]:
    """`all` or a comma-separated list of method names (factory.METHODS); an unknown name raises StellaError."""
    if text.strip() == "all":
        return all_methods()
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise StellaError(f"--methods {text!r}: unknown method {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose all or from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------------------
# one method, in this process


def bench_recipe(method: str, preset: str, batch: int, memory: int, device: str):
    """The training recipe every method is measured on: paper input sizes, `batch` current clips, one process."""
    return resolve_preset(Recipe(data=DataConfig(dataset="synthetic", root="", **SIZES),
                                 model=ModelConfig(preset=preset), method=MethodConfig(name=method, memory_size=memory),
                                 train=TrainConfig(batch_size=batch, device=device)))


def random_batch(batch: int, generator: torch.Generator, first_index: int) -> dict[str, Tensor]:
    """Random clips at the paper's input sizes, with the ids the loader would give (task 0, distinct indices)."""
    S, T, M = SIZES["image_size"], SIZES["target_length"], SIZES["num_mel_bins"]
    return {"video": torch.randn(batch, SIZES["num_frames"], 3, S, S, generator=generator),
            "audio": torch.randn(batch, 1, T, M, generator=generator),
            "label": torch.zeros(batch, dtype=torch.long), "task": torch.zeros(batch, dtype=torch.long),
            "index": torch.arange(first_index, first_index + batch)}


def fill_steps(method: torch.nn.Module, batch: int) -> int:
    """Training steps that fill every replay buffer of the method (at least one warm-up step)."""
    buffers = [v for v in vars(method).values() if isinstance(v, ReservoirBuffer)]
    return max([1] + [math.ceil(b.capacity / batch) for b in buffers])


def measure(method_name: str, *, preset: str = "base", batch: int = 2, device: str = "cpu",
            attention: str = "sdpa", steps: int = 2, memory: int | None = None) -> dict[str, Any]:
    """One method's row (ratios not filled in). Run it in a fresh process for a meaningful CPU peak."""
    memory = memory or 5 * batch
    recipe = bench_recipe(method_name, preset, batch, memory, device)
    dev = torch.device(device)
    with attention_kernel(attention):
        method = build_method(recipe, 0, 1, dev)
        optimizer = build_optimizer(method, recipe.optim)
        amp = amp_dtype(recipe.optim.amp, dev)
        scaler = grad_scaler(amp, dev)
        trainer = Trainer(recipe, Path("."), method, optimizer, scaler, dev, 0, 1, amp, [("bench", ["bench"])],
                          ["bench"], Position(), quiet=True)
        g = torch.Generator().manual_seed(0)
        batches = [random_batch(batch, g, i * batch) for i in range(fill_steps(method, batch) + steps)]
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        rss_start = rss_bytes()
        method.begin_task("bench")
        for b in batches[:-steps]:  # fill the buffer (and warm up)
            trainer.train_step(b)
        if dev.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(dev)
        exclude = [*method.parameters(), *method.buffers()]
        times, activation = [], 0
        for i, b in enumerate(batches[-steps:]):
            b = {k: v.to(dev) for k, v in b.items()}  # the copy to the device is not timed
            with SavedBytes(exclude) as saved:
                sync()
                tic = time.perf_counter()
                trainer.train_step(b)
                sync()
                times.append(time.perf_counter() - tic)
            activation = activation if i else saved.total
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes() - rss_start
    return {"method": method_name, "iter_s": statistics.median(times), "activation_bytes": activation,
            "peak_bytes": peak, "preset": preset, "batch": batch, "attention": attention, "device": device}


# ----------------------------------------------------------------------------------------------------------
# sizes (`stella model`): parameters and tokens, no iteration


def parameter_count(module: nn.Module) -> int:
    """Number of distinct parameters (shared modules counted once)."""
    return sum(p.numel() for p in module.parameters())


PARTS = {"patch_embed": "patch embeddings", "pos_embed": "pos/modality embeddings", "inter_pos_embed":
         "pos/modality embeddings", "modality": "pos/modality embeddings", "blocks_a": "audio layers",
         "blocks_v": "video layers", "blocks_u": "fusion layers", "norm": "final norms", "decoder": "decoder",
         "mask_token": "decoder", "mae_score": "MAE heads"}


def model_summary(cfg: ModelConfig, *, num_frames: int = 4, image_size: int = 224, target_length: int = 1024,
                  num_mel_bins: int = 128, core_video_ratio: float = 0.5, core_audio_ratio: float = 0.5,
                  num_classes: int = 0) -> dict[str, Any]:
    """Parameter and token counts, built on the meta device (no memory, no init cost).

    Returns {"params": {"total", "backbone", "avm", "classifier", "parts": {part: n}}, "tokens": {...}}.
    """
    with torch.device("meta"):
        model = CAVMAE(cfg, num_frames, image_size, target_length, num_mel_bins)
        avm = AVM(cfg.embed_dim, cfg.avm.num_heads, cfg.avm.fix_head_reshape)
        head = Classifier(2 * cfg.embed_dim, num_classes) if num_classes else None
    parts: dict[str, int] = {}
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        part = next(v for k, v in PARTS.items() if top.startswith(k))
        parts[part] = parts.get(part, 0) + param.numel()
    n_cls = parameter_count(head) if head is not None else 0
    L_V, L_A = model.num_video_tokens, model.num_audio_tokens
    n_v, n_a = int(L_V * (1 - cfg.mask_ratio_v)), int(L_A * (1 - cfg.mask_ratio_a))
    K_V, K_A = num_core_tokens(L_V, core_video_ratio), num_core_tokens(L_A, core_audio_ratio)
    return {"params": {"total": parameter_count(model) + parameter_count(avm) + n_cls,
                       "backbone": parameter_count(model), "avm": parameter_count(avm), "classifier": n_cls,
                       "parts": parts},
            "tokens": {"video": L_V, "audio": L_A, "visible_video": n_v, "visible_audio": n_a,
                       "core_video": K_V, "core_audio": K_A,
                       "decoder_video": {"random": L_V, "core": K_V}, "decoder_audio": {"random": L_A, "core": K_A},
                       "targets_video": {"random": L_V - n_v, "core": K_V - n_v},
                       "targets_audio": {"random": L_A - n_a, "core": K_A - n_a}}}


# ----------------------------------------------------------------------------------------------------------
# every method, each in a fresh process


def measure_in_subprocess(method: str, **options: Any) -> dict[str, Any]:
    spec = json.dumps({"method": method, **options})
    done = subprocess.run([sys.executable, "-m", "stella_cli.bench", spec], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise StellaError(f"stella bench: {method} failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict[str, Any]], reference: str = REFERENCE) -> str:
    """Fill iter/activation/peak ratios to the reference row (DER++, else the first row); returns its name."""
    ref = next((r for r in rows if r["method"] == reference), rows[0])
    for row in rows:
        for key in ("iter", "activation", "peak"):
            value = row["iter_s" if key == "iter" else f"{key}_bytes"]
            base = ref["iter_s" if key == "iter" else f"{key}_bytes"]
            row[f"{key}_ratio"] = value / base if base else float("nan")
        row["reference"] = ref["method"]
    return ref["method"]


def run_bench(methods: list[str], *, preset: str = "base", batch: int = 2, device: str = "cpu",
              attention: str = "sdpa", steps: int = 2, memory: int | None = None,
              progress: Any = None) -> list[dict[str, Any]]:
    """Rows for `methods` (validated names), in order, with ratios; `progress(text)` is told what runs."""
    if preset not in MODEL_PRESETS:
        raise StellaError(f"--preset {preset!r}: choose one of {', '.join(MODEL_PRESETS)}")
    if attention not in ATTENTIONS:
        raise StellaError(f"--attention {attention!r}: choose one of {', '.join(ATTENTIONS)}")
    if device not in ("cpu", "cuda"):
        raise StellaError(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise StellaError("--device cuda: CUDA is not available on this machine")
    if batch < 1 or steps < 1 or (memory is not None and memory < 1):
        raise StellaError("--batch, --steps and --memory must be at least 1")
    rows = []
    for name in methods:
        if progress:
            progress(f"{name}: preset {preset}, batch {batch}, {attention} attention, {device}")
        rows.append(measure_in_subprocess(name, preset=preset, batch=batch, device=device, attention=attention,
                                          steps=steps, memory=memory))
    add_ratios(rows)
    return [{k: row[k] for k in ROW_KEYS} for row in rows]


def reference_note(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]["reference"]
    if ref == REFERENCE:
        return "ratios: to DER++"
    why = "not selected" if REFERENCE in METHODS else "not available in this version"
    return f"ratios: to {ref} (DER++ {why})"


def main() -> None:
    """Child process entry: `python -m stella_cli.bench '{"method": ..., ...}'` prints one JSON row."""
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure(spec.pop("method"), **spec)))


if __name__ == "__main__":
    main()
