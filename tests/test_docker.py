"""The Dockerfile cannot be built here (no Docker engine): lint it with hadolint and check its structure."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it is a test dependency (pip install -e '.[test]')")
    return found


def test_hadolint_passes():
    proc = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_an_unpinned_base(tmp_path):
    """The lint step can fail: an unpinned base image is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch\nRUN pip install numpy\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_base_image_pinned_to_a_cuda_pytorch_release():
    bases = [args for word, args in instructions() if word == "FROM"]
    assert len(bases) == 1
    image, _, tag = bases[0].partition(":")
    assert image == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), tag


def test_entrypoint_user_and_volumes():
    pairs = instructions()
    assert ("ENTRYPOINT", '["stella"]') in pairs
    users = [args for word, args in pairs if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    volumes = [args for word, args in pairs if word == "VOLUME"]
    assert volumes and "/data" in volumes[0] and "/runs" in volumes[0]
    run = " ".join(args for word, args in pairs if word == "RUN")
    assert "pip install --no-cache-dir ." in run


def test_no_secrets_in_the_image():
    for word, args in instructions():
        if word in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|AWS_)", args, re.I), args
        if word in ("COPY", "ADD"):
            assert not re.search(r"(\.env|id_rsa|\.netrc|credentials)", args), args


def test_dockerignore_keeps_data_and_runs_out_of_the_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"data", "runs", ".git", ".venv", "*.pt", "*.pth", ".env"} <= ignored
    copied = [args.split()[0] for word, args in instructions() if word == "COPY"]
    assert not any(path in ignored for path in copied), copied
