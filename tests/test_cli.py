"""The `stella` command line: help, errors without tracebacks, model counts, config printing, buffer, convert."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import RANDOM_START

from stella_cli.cli import app, main
from stella_cli.config import load_recipe
from stella_cli.synth import SynthConfig, prepare_synthetic
from stella_cli.train import run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def plain(text: str) -> str:
    """Rich output without box drawing, collapsed whitespace."""
    return re.sub(r"\s+", " ", re.sub(r"[│┃┏┓┗┛━─┡┩└┘╭╮╰╯]", " ", text))


def test_help_lists_every_command_with_a_description():
    out = plain(runner.invoke(app, ["--help"]).output)
    for command in ("prep", "train", "model", "buffer", "convert"):
        assert re.search(rf"\b{command}\b \w+", out), command
    for command in ("prep", "train", "model", "buffer", "convert mae"):
        result = runner.invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0
        options = re.findall(r"--[a-z-]+", result.output)
        assert options, command  # every option is listed with a help line (Typer prints none without help=)


def test_model_prints_the_paper_model(capsys):
    result = runner.invoke(app, ["model", "--preset", "base"])
    out = plain(result.output)
    assert result.exit_code == 0
    assert "total 191,439,361" in out and "backbone 185,534,976" in out and "AVM 5,904,385" in out
    assert "video 784, audio 512" in out and "156 / 102" in out and "core 392 / 256" in out
    synthetic = plain(runner.invoke(app, ["model", "--recipe", str(ROOT / "recipes" / "synthetic.yaml")]).output)
    assert "video 64, audio 192" in synthetic and "core 32 / 96" in synthetic
    assert "mask ratios 0.8 / 0.8: 12 / 38" in synthetic  # the recipe's ratios (the paper's since issue 21)
    init = plain(runner.invoke(app, ["model", "--recipe", str(ROOT / "recipes" / "init_synthetic_heldout.yaml")])
                 .output)
    assert "mask ratios 0.75 / 0.75: 16 / 48" in init  # from random weights the chain keeps more visible tokens


def test_print_config_shows_the_resolved_recipe():
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "synthetic.yaml"), "--print-config",
                                 "--set", "optim.lr=5e-5", "--set", "model.preset=tiny"])
    assert result.exit_code == 0
    assert "lr: 5.0e-05" in result.output and "embed_dim: 64" in result.output


@pytest.mark.parametrize("argv, message", [
    (["train", "recipes/synthetic.yaml", "--set", "optim.lrr=1"], "unknown key optim.'lrr'; did you mean optim.'lr'"),
    (["train", "recipes/synthetic.yaml", "--set", "data.root=/nonexistent/synthetic", "--set",
      "model.checkpoint=random"],
     "no prepared data; run `stella prep synthetic --out /nonexistent/synthetic`"),
    (["model", "--preset", "huge"], "--preset 'huge': choose one of base, small, tiny"),
    (["prep", "kinetics"], "unknown dataset 'kinetics'"),
    (["buffer", "/nonexistent/run"], "/nonexistent/run/checkpoints/latest.pt: no such checkpoint"),
])
def test_bad_input_is_one_clear_line_and_exit_2(monkeypatch, capsys, argv, message):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["stella", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = plain(capsys.readouterr().out)
    assert exit_info.value.code == 2
    assert message in out and "Traceback" not in out


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only a StellaError is an expected failure (one line, exit 2): any other exception, a ValueError included, is
    a bug and reaches the user with its traceback instead of posing as bad input."""
    def buggy(*args, **kwargs):
        raise ValueError("a bug inside stella")

    monkeypatch.setattr("stella_cli.cli.prepare_dataset", buggy)
    monkeypatch.setattr("sys.argv", ["stella", "prep", "synthetic", "--out", str(tmp_path / "data")])
    with pytest.raises(ValueError, match="a bug inside stella"):
        main()
    assert not (tmp_path / "data").exists()  # the folder its lock created is gone with it


def test_buffer_command_on_a_trained_run(tmp_path):
    data = tmp_path / "data"
    prepare_synthetic(data, seed=0, fmt="cache", workers=1, frames_format="raw", progress=False,
                      config=SynthConfig(num_classes=4, num_tasks=2, train_per_class=4, test_per_class=1,
                                         retrieval_per_class=2))
    recipe = load_recipe(ROOT / "recipes" / "synthetic.yaml", [
        f"data.root={data}", "data.num_workers=0", "model.preset=tiny", "method.memory_size=6", "train.epochs=1",
        "train.batch_size=4", f"output.dir={tmp_path / 'run'}", *RANDOM_START])
    run_dir = run(recipe, quiet=True)
    result = runner.invoke(app, ["buffer", str(run_dir)])
    out = plain(result.output)
    assert result.exit_code == 0, result.output
    assert "6 / 6 slots filled, 16 clips offered (1 rank(s))" in out
    counts = re.search(r"clips per task: task1 (\d+), task2 (\d+)", out)
    assert counts and int(counts[1]) + int(counts[2]) == 6
    assert re.search(r"video 4x3x64x64 float32 196,608", out)  # a full clip per slot (STELLA)
    assert "mean_p_v" in out
    finetune = run(load_recipe(run_dir / "config.yaml", ["method.name=finetune", f"output.dir={tmp_path / 'ft'}"]),
                   quiet=True)
    result = runner.invoke(app, ["buffer", str(finetune)])
    assert "method 'finetune' keeps no replay buffer" in str(result.exception)


def test_convert_mae_command(tmp_path):
    from helpers import fake_mae_state_dict

    torch.save(fake_mae_state_dict(), tmp_path / "mae.pth")
    result = runner.invoke(app, ["convert", "mae", str(tmp_path / "mae.pth"), str(tmp_path / "cav.pth"),
                                 "--modality-depth", "1"])
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote .*cav.pth: \d+ tensors mapped, 7 left at zero", plain(result.output))
    converted = torch.load(tmp_path / "cav.pth", map_location="cpu")
    assert "blocks_a.0.attn.qkv.weight" in converted and "blocks_u.0.norm1_a.weight" in converted
