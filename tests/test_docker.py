"""The Dockerfiles, without a Docker engine: hadolint and their structure. `make docker-check` builds and runs the
image (README "Docker"); it needs a Docker engine and is run before each release, not here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
TEST_DOCKERFILE = ROOT / "tests" / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
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


@pytest.mark.parametrize("path", [DOCKERFILE, TEST_DOCKERFILE, ROOT / "scripts" / "standin-base.Dockerfile"])
def test_hadolint_passes(path):
    proc = subprocess.run([hadolint(), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_an_unpinned_base(tmp_path):
    """The lint step can fail: an unpinned base image is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch\nRUN pip install numpy\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_base_image_pinned_to_a_cuda_pytorch_release_and_swappable():
    """FROM ${BASE_IMAGE}, whose default is the real base: docker-check swaps in its stand-in with --build-arg."""
    pairs = instructions()
    assert [args for word, args in pairs if word == "FROM"] == ["${BASE_IMAGE}"]
    assert pairs[0][0] == "ARG" and pairs[0][1].startswith("BASE_IMAGE=")
    image, _, tag = pairs[0][1].removeprefix("BASE_IMAGE=").partition(":")
    assert image == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), tag


def test_entrypoint_user_volumes_and_links():
    pairs = instructions()
    assert ("ENTRYPOINT", '["/usr/local/bin/stella-entrypoint"]') in pairs
    assert ("COPY", "scripts/docker-entrypoint.sh /usr/local/bin/stella-entrypoint") in pairs
    assert (ROOT / "scripts" / "docker-entrypoint.sh").stat().st_mode & 0o111  # executable in the image too
    assert (ROOT / "scripts" / "docker-entrypoint.sh").read_text().rstrip().endswith('exec stella "$@"')
    users = [args for word, args in pairs if word == "USER"]
    assert users == ["1000:1000"]
    assert ("VOLUME", '["/data", "/runs"]') in pairs
    run = " ".join(args for word, args in pairs if word == "RUN")
    assert "pip install --no-cache-dir /tmp/stella" in run and "useradd --create-home --uid 1000 stella" in run
    for link, target in (("data", "/data"), ("runs", "/runs"), ("reports", "/runs/reports")):
        assert f"ln -s {target} /opt/stella/{link}" in run
    assert ("ENV", "HOME=/home/stella") in pairs and "chmod 1777 /home/stella" in run  # any --user uid writes HOME


def test_the_test_image_runs_pytest_on_the_image_as_uid_1000():
    pairs = instructions(TEST_DOCKERFILE)
    assert pairs[:2] == [("ARG", "IMAGE=stella"), ("FROM", "${IMAGE}")]
    assert [args for word, args in pairs if word == "USER"][-1] == "1000:1000"
    assert ("ENTRYPOINT", '["pytest"]') in pairs


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
    copied = [source for path in (DOCKERFILE, TEST_DOCKERFILE) for word, args in instructions(path) if word == "COPY"
              for source in args.split()[:-1] if not source.startswith("--")]
    assert copied == ["pyproject.toml", "README.md", "stella_cli", "recipes", "scripts/docker-entrypoint.sh", "."]
    assert not any(path.split("/")[0] in ignored for path in copied), copied
