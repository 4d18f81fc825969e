"""The module layout README's Architecture section describes: layers, one torch.load, citations that resolve."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stella_cli"
# README "Architecture": a module imports only from lower layers
LAYERS = [
    {"errors"},
    {"files", "console", "media", "audio", "scoring", "replay", "inputs"},
    {"cache", "config", "distributed", "pool", "select", "tracking"},
    {"model", "data", "prep"},
    {"checkpoint", "evaluate", "methods", "synth", "prep_init", "prep_downstream"},
    {"stella", "baselines", "downstream", "plots"},
    {"factory", "probe", "ave", "avs", "localisation"},
    {"train", "report", "reproduce"},
    {"bench", "msrvtt", "analysis"},
    {"eval_run"},
    {"cli"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))
            if p.stem not in ("__init__", "__main__")}


def stella_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported stella_cli module, whether the import is inside a function or class) for every import."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stella_cli"):
            names = [a.name for a in node.names] if node.module == "stella_cli" else [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("stella_cli.")]
        else:
            continue
        found += [(name, node.col_offset > 0) for name in names]
    return found


def test_every_module_is_in_a_layer_and_imports_only_from_lower_layers():
    mods = modules()
    assert set(mods) == set(LAYER), "README's layer table and stella_cli/ list different modules"
    for name, tree in mods.items():
        for dep, _ in stella_imports(tree):
            assert LAYER[dep] < LAYER[name], f"{name}.py (layer {LAYER[name]}) imports {dep}.py (layer {LAYER[dep]})"


def test_function_level_imports_only_in_the_cli_and_no_importlib():
    for name, tree in modules().items():
        late = [dep for dep, inner in stella_imports(tree) if inner]
        assert name == "cli" or not late, f"{name}.py imports {late} inside a function"
        assert "importlib" not in (PACKAGE / f"{name}.py").read_text(), f"{name}.py uses importlib"


def test_only_checkpoint_reads_torch_files():
    readers = [p.name for p in PACKAGE.glob("*.py") if "torch.load(" in p.read_text()]
    assert readers == ["checkpoint.py"]
    calls = re.findall(r"torch\.load\(([^)]*)\)", (PACKAGE / "checkpoint.py").read_text())
    assert len(calls) == 1 and "weights_only=True" in calls[0], calls  # README "Security": one reader, no code run


def test_modules_are_small_and_say_their_job_first():
    for path in PACKAGE.glob("*.py"):
        lines = path.read_text().splitlines()
        assert len(lines) <= 750, f"{path.name}: {len(lines)} lines"
        if path.stem not in ("__main__",):
            assert lines[0].startswith('"""') and len(lines[0]) > 20, f"{path.name}: no one-line docstring first"


def headings(page: Path) -> set[str]:
    """Section numbers of a docs page: '### 3.6 Step F ...' -> '3.6'."""
    return set(re.findall(r"^#+ (\d+(?:\.\d+)*)\b", page.read_text(), flags=re.M))


def test_comments_cite_documents_of_the_repository_and_their_sections_exist():
    pages = {"method.md": headings(ROOT / "docs" / "method.md"),
             "baselines.md": headings(ROOT / "docs" / "baselines.md")}
    files = [*PACKAGE.glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "recipes").glob("*.yaml"),
             *(ROOT / "benchmarks").glob("*.py")]
    cited = 0
    for path in files:
        text = path.read_text()
        assert not re.search(r"\b(stella|baselines)_spec\b", text), f"{path.name} cites a spec outside the repo"
        for page, section in re.findall(r"(method\.md|baselines\.md) §(\d+(?:\.\d+)*)", text):
            assert section in pages[page], f"{path.name}: {page} §{section} is not a section of docs/{page}"
            cited += 1
    assert cited > 150


def test_test_modules_never_import_each_other():
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.split(".")[-1].startswith(("test_", "conftest")) for n in names), \
                f"tests/{path.name} imports {names}: shared helpers belong in tests/helpers.py, fixtures in conftest.py"
