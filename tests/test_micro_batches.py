"""Micro-batches (optim.micro_batch_size, method.md §5.1): one optimiser step of a replay method replays as many
rows (MIR: scores as many candidates) with micro-batches as without, the same rows, leaves the same memory, and the
EMA teachers count and update once per optimiser step. Through the trainer's own `train_step`, tiny model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import assert_same_weights, batch, final_weights, retrieval_rows, tiny_recipe

from stella_cli.config import AVMConfig, MethodConfig, ModelConfig, OptimConfig, Recipe, resolve_model_preset
from stella_cli.factory import METHODS
from stella_cli.methods import Method
from stella_cli.model import CAVMAE
from stella_cli.train import Position, Trainer, TrainingInterrupted, build_optimizer, run

SMALL = dict(num_frames=2, image_size=32, target_length=64, num_mel_bins=32)  # L_V = 8, L_A = 8
REPLAY_METHODS = ("er", "derpp", "lump", "mir", "gmed", "clser", "esmer", "stella", "stella+")
B, MEMORY, MICRO = 4, 20, 3  # per-rank batch 4 in micro-batches of 3 + 1; 20 slots = 5 x B_m MIR candidates


def build(name: str) -> Method:
    torch.manual_seed(0)
    backbone = CAVMAE(resolve_model_preset(ModelConfig(preset="tiny")), **SMALL)
    return METHODS[name].cls(backbone, MethodConfig(name=name), avm_cfg=AVMConfig(), batch_size=B,
                             memory_per_rank=MEMORY, seed=0, rank=0, device=torch.device("cpu"))


def trainer(method: Method, micro: int | None) -> Trainer:
    recipe = dataclasses.replace(Recipe(), optim=OptimConfig(micro_batch_size=micro))
    return Trainer(recipe, Path("."), method, build_optimizer(method, recipe.optim),
                   torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), 0, 1, None, [("t", ["t"])], ["t"],
                   Position())


def copy_of(method: Method, name: str) -> Method:
    """A second method in the same state, restored as a checkpoint restores one."""
    other = build(name)
    other.load_state_dict(method.state_dict())
    other.load_extra_state(method.extra_state())
    return other


class Recorder:
    """Per call of `step` (a micro-batch): the slots drawn from the memory, the rows replayed into the training
    pass, and the rows of that pass (the backbone's last call in the micro-batch)."""

    def __init__(self, method: Method, name: str):
        self.calls: list[dict] = []
        step, sample = method.step, method.sample

        def recording_step(batch):
            self.calls.append({"current": batch["video"].shape[0], "drawn": [], "clips": [], "passes": [],
                               "seen": method.buffer.n_seen})
            return step(batch)

        def recording_sample(n, device, return_indices=False):
            rows, idx = sample(n, device, return_indices=True)
            self.calls[-1]["drawn"] += idx.tolist()
            self.calls[-1]["clips"] += rows["index"].tolist()
            return (rows, idx) if return_indices else rows

        method.step, method.sample = recording_step, recording_sample
        method.backbone.register_forward_hook(lambda m, args, out: self.calls[-1]["passes"].append(args[0].shape[0]))
        if name == "mir":  # MIR draws candidates and replays the chosen ones
            replay = method.replay

            def recording_replay(batch, n):
                rows = replay(batch, n)
                self.calls[-1]["chosen"] = rows["video"].shape[0]
                return rows

            method.replay = recording_replay

    def replayed(self, name: str) -> list[int]:
        """Rows trained on as replay per micro-batch: LUMP mixes one partner into each clip, the others append
        the replayed rows to the current ones in the training pass."""
        if name == "lump":
            assert all(c["passes"][-1] == c["current"] for c in self.calls)
            return [len(c["drawn"]) for c in self.calls]
        return [c["passes"][-1] - c["current"] for c in self.calls]


@pytest.mark.parametrize("name", REPLAY_METHODS)
def test_micro_batches_replay_as_many_rows_per_optimiser_step(name):
    method = build(name)
    fill = trainer(method, None)
    for step in range(MEMORY // B):  # 20 stored clips: B_m = 4 replayed rows, MIR's 5 x 4 = 20 candidates
        fill.train_step(batch(B, seed=step, sizes=SMALL))
    assert len(method.buffer) == MEMORY
    runs = {}
    for micro in (None, MICRO):
        m = copy_of(method, name)
        record, t = Recorder(m, name), trainer(m, micro)
        steps = []
        for step in range(2):  # two optimiser steps
            record.calls = []
            teacher_step = getattr(m, "global_step", None)
            seen = m.buffer.n_seen
            t.train_step(batch(B, seed=10 + step, sizes=SMALL))
            assert [c["seen"] for c in record.calls] == [seen] * len(record.calls)  # memory written at the end
            steps.append({"replayed": record.replayed(name), "drawn": [len(c["drawn"]) for c in record.calls],
                          "slots": sorted(s for c in record.calls for s in c["drawn"]),
                          "clips": sorted(s for c in record.calls for s in c["clips"]),
                          "chosen": [c.get("chosen") for c in record.calls],
                          "own": list(range((10 + step) * B, (11 + step) * B)),
                          "teacher_steps": None if teacher_step is None else m.global_step - teacher_step})
        runs[micro] = (steps, m)
    (whole, m_whole), (micro, m_micro) = runs[None], runs[MICRO]
    for w, u in zip(whole, micro):
        assert w["replayed"] == [4] and u["replayed"] == [3, 1]  # B_m = 4 per optimiser step, shared 3 + 1
        if name == "mir":
            assert w["drawn"] == [20] and u["drawn"] == [15, 5]  # 5 x B_m candidates scored per step
            assert w["chosen"] == [4] and u["chosen"] == [3, 1]
        else:
            assert w["drawn"] == [4] and u["drawn"] == [3, 1]
        assert u["slots"] == w["slots"] and len(set(u["slots"])) == len(u["slots"])  # one draw, no row twice
        assert u["clips"] == w["clips"] and not set(u["clips"]) & set(u["own"])  # stored clips, not this step's
        if name in ("clser", "esmer"):
            assert w["teacher_steps"] == u["teacher_steps"] == 1
    # the same clips in the same slots, the same reservoir, teacher and λ draws as without micro-batches
    assert m_micro.buffer.n_seen == m_whole.buffer.n_seen == MEMORY + 2 * B
    assert torch.equal(m_micro.buffer.fields["index"], m_whole.buffer.fields["index"])
    for g in m_whole.generators:
        if g != "mask" and g != "select":  # masks are drawn per micro-batch
            assert torch.equal(m_micro.generators[g].get_state(), m_whole.generators[g].get_state()), g
    if name == "lump":  # one λ per optimiser step
        assert m_micro.mix_rng.bit_generator.state == m_whole.mix_rng.bit_generator.state


def test_a_micro_batch_takes_its_share_of_the_step():
    """⌊n·stop/B⌋ − ⌊n·start/B⌋: 4 rows over micro-batches of 3 + 1 → 3, 1; 2 rows over five micro-batches of 1
    → 0, 0, 1, 0, 1 (they add up to 2); a step called on its own takes all n."""
    method = build("er")
    assert method.share(4) == 4  # no step open: a whole step
    for rows, sizes, n, expected in ((4, [3, 1], 4, [3, 1]), (5, [1] * 5, 2, [0, 0, 1, 0, 1]),
                                     (4, [2, 2], 7, [3, 4])):
        method.begin_step(rows)
        shares = []
        for size in sizes:
            method.micro = (method.micro[1] if method.micro else 0, (method.micro[1] if method.micro else 0) + size)
            shares.append(method.share(n))
        method.end_step()
        assert shares == expected


def test_mir_candidates_from_a_memory_not_yet_full():
    """8 stored rows, B_m = 4: C = min(20, 8) = 8 candidates per step, split so each micro-batch scores at least
    what it replays: 3 + share(8 − 4) = 6 and 1 + 1 = 2."""
    method = build("mir")
    fill = trainer(method, None)
    for step in range(2):
        fill.train_step(batch(B, seed=step, sizes=SMALL))
    record, t = Recorder(method, "mir"), trainer(method, MICRO)
    t.train_step(batch(B, seed=10, sizes=SMALL))
    assert [len(c["drawn"]) for c in record.calls] == [6, 2] and [c["chosen"] for c in record.calls] == [3, 1]


def test_a_run_in_micro_batches_resumes_exactly(tmp_path, data_root):
    """ESMER (memory, teacher, loss statistics: every kind of per-step state) in micro-batches of 3 + 1, stopped
    mid task 2 and resumed: the same weights, results and memory as the uninterrupted run."""
    recipe = dict(recipe="synthetic_esmer.yaml")
    full = run(tiny_recipe(tmp_path, data_root, "full", "optim.micro_batch_size=3", **recipe), quiet=True)
    with pytest.raises(TrainingInterrupted, match="stopped at step 5"):
        run(tiny_recipe(tmp_path, data_root, "stopped", "optim.micro_batch_size=3", **recipe), quiet=True,
            stop_after=5)
    stopped = run(tiny_recipe(tmp_path, data_root, "stopped", "optim.micro_batch_size=3", **recipe), resume=True,
                  quiet=True)
    assert_same_weights(final_weights(stopped), final_weights(full))
    assert retrieval_rows(stopped) == retrieval_rows(full)
    extra = [torch.load(d / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)["method_extra"]
             for d in (full, stopped)]
    assert extra[0]["global_step"] == extra[1]["global_step"] == 8  # 2 tasks x 4 optimiser steps, not 16 chunks
    assert (extra[0]["loss_mean"], extra[0]["loss_std"]) == (extra[1]["loss_mean"], extra[1]["loss_std"])
    assert all(torch.equal(extra[0]["buffer"]["fields"][k], extra[1]["buffer"]["fields"][k])
               for k in extra[0]["buffer"]["fields"])
