"""The code of a git ref, for the benchmarks' before/after comparisons (`--before REF`).

`tree(ref)` extracts `git archive REF` into a temporary folder (once per ref and process) and returns it; a
subprocess run with PYTHONPATH=<that folder> then runs the old code, and `module(ref, path)` imports one old file.
Default ref: BEFORE_SPEED, the last commit before issue 13's speed work, so the comparisons stay reproducible after
the merge.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BEFORE_SPEED = "4a77b8e"  # bench_model: cut the core patches with select.gather_patches (before issue 13)


@functools.lru_cache(maxsize=None)
def tree(ref: str) -> Path:
    """A temporary copy of the repository at `ref` (removed at exit)."""
    out = Path(tempfile.mkdtemp(prefix=f"stella-{ref.replace('/', '_')}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(out, filter="data")
        else:
            tar.extractall(out)  # our own git archive
    return out


def module(ref: str, relpath: str, name: str, moved: dict[str, dict[str, object]] | None = None) -> ModuleType:
    """Import one file of the tree at `ref` under a fresh name (its own imports resolve to the current tree).

    moved: {module: {name: object}} for names the old file imports from a module that no longer holds them (the
    redesign moved e.g. load_authors_checkpoint from model.py to checkpoint.py); they are attached to that module
    only while the old file is imported.
    """
    attached = []
    for mod_name, names in (moved or {}).items():
        target = importlib.import_module(mod_name)
        for attr, obj in names.items():
            if not hasattr(target, attr):
                setattr(target, attr, obj)
                attached.append((target, attr))
    try:
        spec = importlib.util.spec_from_file_location(name, tree(ref) / relpath)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for target, attr in attached:
            delattr(target, attr)
    return mod
