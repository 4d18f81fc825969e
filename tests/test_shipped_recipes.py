"""The recipes ship with the package: `stella train NAME` and `stella reproduce` find them outside a clone (an
installed wheel, another working folder), as model zoos ship their configs; a recipe file that exists still wins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import tiny_synthetic

from stella_cli.config import RecipeError, find_recipe, load_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The package as pip installs it: a wheel built from a copy of the sources (nothing is written into the
    clone), unpacked into a folder that PYTHONPATH puts before the clone's editable install."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "stella_cli", src / "stella_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "recipes", src / "recipes")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("stella_cli-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp / "site")
    return tmp / "site"


def stella(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "stella_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_the_wheel_ships_every_recipe(site):
    shipped = sorted(p.name for p in (site / "stella_cli" / "recipes").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")) and len(shipped) == 50


def test_a_shipped_recipe_by_name_or_readme_path_from_another_folder(site, tmp_path):
    """`extends: synthetic.yaml` resolves inside the installed package: data.root and the preset come from it."""
    by_name = stella(site, tmp_path, "train", "synthetic_stella", "--print-config")
    by_path = stella(site, tmp_path, "train", "recipes/synthetic_stella.yaml", "--print-config")
    assert by_name.returncode == by_path.returncode == 0, by_name.stdout + by_name.stderr + by_path.stderr
    assert by_name.stdout == by_path.stdout
    assert "  root: data/synthetic\n" in by_name.stdout and "  preset: tiny\n" in by_name.stdout
    assert "  name: stella\n" in by_name.stdout and "  dir: runs/synthetic_stella\n" in by_name.stdout


def test_an_unknown_name_is_one_line_with_the_closest_names(site, tmp_path):
    proc = stella(site, tmp_path, "train", "synthetic_stela")
    assert proc.returncode == 2 and proc.stdout.count("\n") == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == (f"error: synthetic_stela: no such recipe file, nor a shipped recipe 'synthetic_stela'; did "
                           f"you mean synthetic_stella, synthetic_stella_plus, synthetic_er? (shipped recipes: "
                           f"{site / 'stella_cli' / 'recipes'})\n")


def test_a_recipe_file_that_exists_wins_over_the_shipped_one(tmp_path, monkeypatch):
    shipped = shipped_recipes()  # a clone's recipes/ (editable install) or the installed package's (Docker image)
    monkeypatch.chdir(tmp_path)
    assert find_recipe("synthetic_er") == find_recipe("synthetic_er.yaml") == shipped / "synthetic_er.yaml"
    assert find_recipe("recipes/synthetic_er.yaml") == shipped / "synthetic_er.yaml"
    (tmp_path / "recipes").mkdir()
    for path in (tmp_path / "synthetic_er.yaml", tmp_path / "recipes" / "synthetic_er.yaml"):
        path.write_text(f"extends: {shipped / 'synthetic_er.yaml'}\ntrain:\n  epochs: 3\n")
    assert load_recipe("synthetic_er.yaml").train.epochs == load_recipe("recipes/synthetic_er.yaml").train.epochs == 3
    assert load_recipe("synthetic_er").train.epochs == 10  # a bare name without .yaml is always the shipped recipe
    with pytest.raises(RecipeError, match=r"^mine/synthetic_er\.yaml: recipe file not found$"):
        find_recipe("mine/synthetic_er.yaml")  # a path anywhere else is never replaced by a shipped recipe


def test_reproduce_runs_the_shipped_recipes_from_another_folder(site, tmp_path):
    """The run starts from the shipped recipe (named in the failure line) and fails at once on a task the data
    does not have (a bad value such as train.batch_size=0 is refused before any run starts)."""
    tiny_synthetic(tmp_path / "data")
    proc = stella(site, tmp_path, "reproduce", "synthetic", "--methods", "finetune", "--seeds", "3", "--runs",
                  str(tmp_path / "runs"), "--set", f"data.root={tmp_path / 'data'}", "--set", "data.tasks=[nope]",
                  "--set", "model.checkpoint=random", "--set", "model.avm.checkpoint=")  # no chain: its data is elsewhere
    recipe = site / "stella_cli" / "recipes" / "synthetic_finetune.yaml"
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert f"{recipe} (seed 3) failed with exit code 2" in proc.stdout
