"""`stella train`: continual pre-training over a task sequence (method.md §5), with per-task retrieval.

run() -> train_task() -> train_step(), top to bottom. One optimiser (Adam, constant LR) for the whole stream;
the method's state (AVM, replay buffer, generators) carries across tasks. A checkpoint is one flat dict written
atomically, at task ends, every train.checkpoint_every steps and every train.checkpoint_minutes; a run directory
is held by one process at a time (its .stella.lock), claimed by its first checkpoint and never overwritten without
--resume (an earlier start that stopped before that is reused); SIGINT/SIGTERM save a checkpoint at the next step
boundary, so a resumed run continues the same stream and ends with the same weights. Expected failures are
errors.py types: bad input or a full disk exits 2, a non-finite value 3 (the divergence guard, which every method
goes through), a saved stop 130.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stella_cli import evaluate
from stella_cli.cache import read_manifest
from stella_cli.checkpoint import (LATEST, check_compatible, read_checkpoint, run_checkpoints, task_checkpoint_name,
                                   write_checkpoint)
from stella_cli.config import (RANDOM, OptimConfig, Recipe, load_recipe, per_rank_batch, recipe_to_dict,
                               recipe_to_yaml)
from stella_cli.console import console, is_main, log
from stella_cli.data import AVDataset, build_loader, check_prepared, num_batches
from stella_cli.distributed import (all_gather_object, all_reduced, amp_dtype, barrier, broadcast_object, grad_scaler,
                                    no_sync, setup_distributed, unwrap, wrap)
from stella_cli.errors import DivergenceError, Interrupted, StellaError, WriteFailed
from stella_cli.factory import METHODS, build_method, check_initial_checkpoint, check_method
from stella_cli.files import LOCK_NAME, atomic_write_text, holding, make_dir
from stella_cli.methods import Method
from stella_cli.model import weight_decay_groups
from stella_cli.replay import merge_state_dicts, split_state_dict, summarize_buffer
from stella_cli.tracking import METRICS, TRACKERS, MetricsLog, check_tracker


class TrainingInterrupted(Interrupted, RuntimeError):
    """Raised after a checkpoint has been saved because a stop was requested (signal or stop_after); exit 130."""


# ----------------------------------------------------------------------------------------------------------
# optimiser and precision


def build_optimizer(method: Method, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam, L2-style weight decay on weights with ndim > 1 except the pos/modality/mask tokens (method.md §1.2)."""
    skip = {f"backbone.{n}" for n in method.backbone.no_weight_decay()}
    groups = weight_decay_groups(method.named_parameters(), cfg.weight_decay, skip)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))


# ----------------------------------------------------------------------------------------------------------
# run directory and checkpoints


RUN_FILES = {"config.yaml", "checkpoints", "results", METRICS, *TRACKERS}  # what a start writes before any checkpoint


def run_files(run_dir: Path) -> set[str]:
    """The names in a run directory, its lock file aside."""
    return {p.name for p in run_dir.iterdir()} - {LOCK_NAME} if run_dir.is_dir() else set()


def is_claimed(run_dir: Path) -> bool:
    """A run directory belongs to a run once it holds a checkpoint (temp files of a killed save do not count)."""
    return bool(run_checkpoints(run_dir))


def is_empty_claim(run_dir: Path) -> bool:
    """A start that stopped before its first checkpoint: some of the files a start writes, and no checkpoint."""
    files = run_files(run_dir)
    return bool(files) and files <= RUN_FILES and not is_claimed(run_dir)


@contextmanager
def holding_run_dir(run_dir: Path) -> Iterator[None]:
    """The run directory is this run's while it trains (files.holding): rank 0 holds its lock, every rank gets the
    refusal when another process has it. A folder with other files than a stella run's is refused first, before
    anything (the lock file included) is written into it."""
    if run_files(run_dir) and not is_claimed(run_dir) and not is_empty_claim(run_dir):
        raise StellaError(f"{run_dir} holds other files than a stella run "
                          f"({', '.join(sorted(run_files(run_dir)))[:200]}); choose another "
                          f"output.dir (e.g. --set output.dir={run_dir}_2)")
    with ExitStack() as held:
        refusal = None
        if is_main():
            try:
                held.enter_context(holding(run_dir, advice="wait for it to end or stop it (then continue with "
                                                           "--resume), or choose another output.dir (e.g. --set "
                                                           f"output.dir={run_dir}_2)"))
            except StellaError as err:
                refusal = err
        refusal = broadcast_object(refusal)
        if refusal is not None:
            raise refusal
        yield


def prepare_run_dir(recipe: Recipe, resume: bool) -> Path:
    """Refuse to overwrite a run (every rank checks before rank 0 writes anything), then create its folders.

    A folder left by a start that wrote no checkpoint is not a run: it is emptied and reused, saying so.
    """
    run_dir = Path(recipe.output.dir)
    latest = run_dir / "checkpoints" / LATEST
    reuse = False
    if resume and not latest.is_file():
        if is_claimed(run_dir):
            others = run_checkpoints(run_dir)
            raise StellaError(f"{latest}: missing, but {run_dir / 'checkpoints'} holds {others[-1].name}; copy it to "
                              f"latest.pt to resume from it, or start a new output.dir")
        raise StellaError(f"{latest}: nothing to resume (start without --resume)")
    if not resume and run_files(run_dir):
        if is_claimed(run_dir):
            raise StellaError(f"{run_dir} already exists: pass --resume to continue it, or choose another "
                              f"output.dir (e.g. --set output.dir={run_dir}_2)")
        reuse = True  # an empty claim (holding_run_dir refused any other folder)
    barrier()
    if is_main() and not resume:
        if reuse:
            log(f"[yellow]reusing {run_dir}: an earlier start stopped before its first checkpoint")
            for name in ("checkpoints", "results", *TRACKERS):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            (run_dir / METRICS).unlink(missing_ok=True)
        make_dir(run_dir / "checkpoints")
        make_dir(run_dir / "results")
        atomic_write_text(run_dir / "config.yaml", recipe_to_yaml(recipe))
    barrier()
    return run_dir


@dataclass
class Position:
    """Where the stream is: the next batch to run. Saved in every checkpoint."""

    task: int = 0
    epoch: int = 0
    batch: int = 0
    step: int = 0  # optimiser steps so far
    history: list[dict[str, Any]] = field(default_factory=list)  # retrieval rows (accuracy matrix)


# ----------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class Trainer:
    recipe: Recipe
    run_dir: Path
    method: torch.nn.Module  # the Method, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int
    world: int
    amp: torch.dtype | None
    schedule: list[tuple[str, list[str]]]  # (name, tasks whose train clips it uses)
    all_tasks: list[str]
    pos: Position
    quiet: bool = False
    stop_after: int | None = None
    stop_requested: bool = False
    last_good: Path | None = None
    last_save: float = field(default_factory=time.monotonic)  # for train.checkpoint_minutes
    metrics: MetricsLog | None = None  # metrics.jsonl and the train.log_to tracker, on rank 0

    def __post_init__(self) -> None:
        unwrap(self.method).attach_optimizer(self.optimizer, self.scaler)  # MIR / GMED take virtual steps with them

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        method = unwrap(self.method)
        extra = method.extra_state()
        if self.world > 1:  # every rank's generators, and one merged buffer (method.md §9.3 B22), in rank 0's file
            gathered = all_gather_object(extra)
            extra = {"per_rank": [{k: v for k, v in e.items() if k != "buffer"} for e in gathered]}
            if "buffer" in gathered[0]:
                extra["buffer"] = merge_state_dicts([e["buffer"] for e in gathered])
        return {
            "model": method.backbone.state_dict(),
            "method": {k: v for k, v in method.state_dict().items() if not k.startswith("backbone.")},
            "method_extra": extra,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": self.pos.__dict__,
            "world_size": self.world,
            "recipe": recipe_to_dict(self.recipe),
        }

    def save(self, *names: str) -> None:
        """Write the state once under the first name; further names are hard links to it (copies if the file
        system has none), each put in place atomically."""
        state = self.state()
        if self.metrics is not None:  # the curves on disk reach the checkpoint: a resume purges only what follows
            self.metrics.flush()
        if is_main():
            first = self.run_dir / "checkpoints" / names[0]
            write_checkpoint(first, state, also=names[1:])
            self.last_good = first
        self.last_save = time.monotonic()
        barrier()

    def load(self, path: Path) -> None:
        state = read_checkpoint(path)
        method = unwrap(self.method)
        check_compatible(state, path, method_name=self.recipe.method.name, method=method)
        if state["world_size"] != self.world:  # the generators are per rank
            raise StellaError(f"{path}: saved with {state['world_size']} processes, resuming with {self.world}; "
                              "resume with the same number of processes")
        method.load_state_dict({**state["method"], **{f"backbone.{k}": v for k, v in state["model"].items()}})
        extra = state["method_extra"]
        if self.world > 1:
            rank_extra = dict(extra["per_rank"][self.rank])
            if "buffer" in extra:
                rank_extra["buffer"] = split_state_dict(extra["buffer"], self.world)[self.rank]
            extra = rank_extra
        method.load_extra_state(extra)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.pos = Position(**state["position"])
        self.last_good = path

    # -- training -------------------------------------------------------------------------------------------
    def run(self) -> None:
        while self.pos.task < len(self.schedule):
            name, tasks = self.schedule[self.pos.task]
            unwrap(self.method).begin_task(name)
            self.train_task(name, tasks)
            unwrap(self.method).end_task(name)
            self.evaluate(name)
            self.pos = Position(task=self.pos.task + 1, step=self.pos.step, history=self.pos.history)
            self.save(task_checkpoint_name(self.pos.task, name), LATEST)

    def train_task(self, name: str, tasks: list[str]) -> None:
        r = self.recipe
        dataset = AVDataset(r.data, "train", tasks=tasks, train=True, seed=r.train.seed)
        batch = per_rank_batch(r.train, self.world)
        steps_per_epoch = num_batches(len(dataset), batch, drop_last=True, world_size=self.world)
        if steps_per_epoch == 0:
            raise StellaError(f"task {name!r}: {len(dataset)} training clips, fewer than train.batch_size="
                              f"{r.train.batch_size}")
        with self.progress(name, r.train.epochs * steps_per_epoch) as (bar, job):
            bar.update(job, completed=self.pos.epoch * steps_per_epoch + self.pos.batch)
            while self.pos.epoch < r.train.epochs:
                epoch_key = self.pos.task * 10_000 + self.pos.epoch  # unique per (task, epoch) for shuffling/augment
                dataset.set_epoch(epoch_key)
                loader = build_loader(dataset, batch, shuffle=True, seed=r.train.seed, epoch=epoch_key,
                                      drop_last=True, num_workers=r.data.num_workers, rank=self.rank,
                                      world_size=self.world, start_batch=self.pos.batch)
                tic, clips = time.perf_counter(), 0
                for batch_data in loader:
                    losses = self.train_step(batch_data)
                    self.pos.batch += 1
                    self.pos.step += 1
                    clips += batch_data["video"].shape[0] * self.world
                    rate = clips / (time.perf_counter() - tic)
                    total = sum(losses.values())
                    bar.update(job, advance=1, description=f"{name} ep {self.pos.epoch + 1}/{r.train.epochs} "
                                                           f"loss {total:.3f} {rate:.1f} clips/s")
                    if self.pos.step % r.train.log_every == 0:
                        self.log_metrics({"task": name, "epoch": self.pos.epoch, **losses, "loss": total,
                                          "clips_per_s": rate, "lr": self.optimizer.param_groups[0]["lr"]})
                    self.end_step()
                self.pos.epoch += 1
                self.pos.batch = 0

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step; micro-batches accumulate gradients when optim.micro_batch_size is set.

        The method sees the step whole (Method.begin_step / end_step): its micro-batches share the step's replayed
        rows, memory writes and teacher update, so a step trains on as many replayed rows with micro-batches as
        without (method.md §5.1)."""
        method, opt = self.method, self.optimizer
        size = batch["video"].shape[0]
        micro = self.recipe.optim.micro_batch_size or size
        chunks = [{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, size, micro)]
        opt.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        unwrap(method).begin_step(size)
        for i, chunk in enumerate(chunks):
            chunk = {k: v.to(self.device, non_blocking=True) for k, v in chunk.items()}
            with no_sync(method, sync=i == len(chunks) - 1):  # DDP all-reduces after the last chunk only
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    losses = method(chunk)
                total = sum(losses.values()) / len(chunks)
                self.check_finite(losses, unwrap(method).pop_non_finite())
                self.scaler.scale(total).backward()
            for k, v in losses.items():
                logged[k] = logged.get(k, 0.0) + v.item() / len(chunks)
        unwrap(method).end_step()
        self.scaler.step(opt)
        self.scaler.update()
        unwrap(method).after_optimizer_step()
        return logged

    def check_finite(self, losses: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
        """The divergence guard, for every method: its loss terms, and the intermediate values it flagged before
        sampling from them (Method.check_finite: STELLA's AVM logits, importance, RCA probabilities). All ranks
        stop together (one all_reduce), before backward, so no checkpoint is ever written from a diverged state."""
        names = list(values) + list(losses)  # where a NaN arises first, then what it reached
        bad = torch.stack([v.reshape(()) for v in values.values()]
                          + [~torch.isfinite(v.detach().float()).all() for v in losses.values()]).cpu()  # one sync
        flags = bad.float()
        if self.world > 1:
            flags = all_reduced(flags, self.device)
        if flags.sum().item() > 0:
            name, _ = self.schedule[self.pos.task]
            which = [n for n, f in zip(names, flags.tolist()) if f > 0]
            terms = ", ".join(f"{k}={losses[k].item():.4g}" for k in losses)
            # --resume would replay the same steps bit for bit (it keeps the run's recipe), so the advice is a new lr
            kept = (f"the last good checkpoint is {self.last_good}; start again with a lower optim.lr in a new "
                    f"output.dir" if self.last_good else
                    "no checkpoint was written yet; start again with a lower optim.lr (the run directory is reused)")
            raise DivergenceError(f"non-finite {', '.join(which)} at task {name!r}, epoch {self.pos.epoch}, step "
                                  f"{self.pos.step + 1} ({terms}); stopping: training diverged, {kept}")

    def end_step(self) -> None:
        """After every step: a requested stop, or a 'latest' checkpoint when train.checkpoint_every steps or
        train.checkpoint_minutes have passed (rank 0's clock decides for all ranks: one all_reduce)."""
        t = self.recipe.train
        due = bool(t.checkpoint_every) and self.pos.step % t.checkpoint_every == 0
        timed = t.checkpoint_minutes > 0 and time.monotonic() - self.last_save >= 60 * t.checkpoint_minutes
        flags = torch.tensor([float(self.stop_requested or self.pos.step == self.stop_after),
                              float(due or (timed and is_main()))])
        if self.world > 1:
            flags = all_reduced(flags, self.device)
        stop, save = flags.tolist()
        if stop > 0:
            self.save(LATEST)
            raise TrainingInterrupted(f"stopped at step {self.pos.step} (task {self.pos.task + 1}/"
                                      f"{len(self.schedule)}, epoch {self.pos.epoch + 1}); checkpoint saved, continue "
                                      f"with `stella train ... --resume`")
        if save > 0:
            self.save(LATEST)

    # -- evaluation and logging -----------------------------------------------------------------------------
    def evaluate(self, name: str) -> None:
        r = self.recipe
        if r.eval.retrieval and is_main():
            row = evaluate.gallery_row(unwrap(self.method).backbone, r, self.all_tasks, self.device, self.amp)
            self.pos.history.append({"after_task": name, "step": self.pos.step, **row, **self.memory_use()})
            scores = row["scores"]
            checkpoint = self.run_dir / "checkpoints" / task_checkpoint_name(self.pos.task + 1, name)  # written next
            summary = evaluate.write_results(self.run_dir / "results", self.pos.history, self.all_tasks,
                                             r.eval.recall_at, {"checkpoint": str(checkpoint), "command":
                                                                "stella " + " ".join(sys.argv[1:]),
                                                                "recipe": str(self.run_dir / "config.yaml")})
            self.log_metrics({"event": "retrieval", "after_task": name, "scores": scores})
            a2v, v2a = scores["a2v"]["all"], scores["v2a"]["all"]  # printed with --quiet too (it hides bars only)
            log(f"[bold]after {name}[/bold]: A->V R@1/5/10 {a2v['R@1']:.1f}/{a2v['R@5']:.1f}/{a2v['R@10']:.1f}"
                f"  V->A {v2a['R@1']:.1f}/{v2a['R@5']:.1f}/{v2a['R@10']:.1f}"
                f"  (avg A so far: {summary['a2v']['avg']['A']:.2f} / {summary['v2a']['avg']['A']:.2f})")
        if self.world > 1:  # every rank keeps the same history, so any rank's checkpoint state agrees
            self.pos.history = broadcast_object(self.pos.history)

    def memory_use(self) -> dict[str, Any]:
        """{'memory': ...} for a replay method: the size of one stored slot, read from the buffer itself
        (replay.summarize_buffer: every stored field of a clip), and rank 0's fill; {} without a buffer."""
        buffer = getattr(unwrap(self.method), "buffer", None)
        if buffer is None or buffer.is_empty():
            return {}
        info = summarize_buffer(buffer.state_dict(copy=False))
        return {"memory": {"slots": self.recipe.method.memory_size, "bytes_per_clip": info["bytes_per_clip"],
                           "filled_rank0": info["filled"], "world_size": self.world}}

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log({"step": self.pos.step, "time": time.time(), **record})

    def progress(self, name: str, total: int):
        return _TaskProgress(name, total, enabled=is_main() and not self.quiet)


class _TaskProgress:
    """rich progress bar for one task on rank 0, or a no-op."""

    def __init__(self, name: str, total: int, enabled: bool):
        self.total, self.enabled, self.name = total, enabled, name
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, disable=not enabled)

    def __enter__(self):
        self.bar.__enter__()
        return self.bar, self.bar.add_task(self.name, total=self.total)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


# ----------------------------------------------------------------------------------------------------------
# entry point


def run(recipe: Recipe, *, resume: bool = False, quiet: bool = False, stop_after: int | None = None) -> Path:
    """Train the recipe's task stream; returns the run directory. Raises TrainingInterrupted after a saved stop."""
    check_method(recipe, "the recipe")
    rank, world, device = setup_distributed(recipe.train.device)
    with holding_run_dir(Path(recipe.output.dir)):  # no second process in it, from here to the end
        return train_stream(recipe, rank, world, device, resume=resume, quiet=quiet, stop_after=stop_after)


def train_stream(recipe: Recipe, rank: int, world: int, device: torch.device, *, resume: bool, quiet: bool,
                 stop_after: int | None) -> Path:
    """run() in the held run directory: the checks, the run directory, the model, then the task loop."""
    if resume and is_empty_claim(Path(recipe.output.dir)):  # nothing to resume: prepare_run_dir reuses it, saying so
        resume = False
    if resume:  # the saved recipe is the run's recipe
        saved = Path(recipe.output.dir) / "config.yaml"
        if saved.is_file():
            # the folder given is the run, wherever it was first written (a moved or copied run resumes in place)
            run_recipe = dataclasses.replace(load_recipe(saved), output=recipe.output)
            ignored = changed_keys(recipe_to_dict(run_recipe), recipe_to_dict(recipe))
            if ignored:
                log(f"[yellow]--resume continues with {saved}; ignoring the differing {', '.join(ignored)}")
            recipe = run_recipe
    if not resume:  # before any data is read; a resumed run's weights are in its own checkpoint
        check_initial_checkpoint(recipe, "the recipe")
        if recipe.model.checkpoint == RANDOM:
            instead = " instead of the pre-trained start the recipe names" if recipe.model.checkpoint_made_by else ""
            log(f"[yellow]model.checkpoint={RANDOM}: the backbone starts from random weights (train.seed="
                f"{recipe.train.seed}){instead}, on purpose")
    check_tracker(recipe.train.log_to)  # before any data is read
    meta = check_prepared(recipe.data)  # also refuses data.tasks that the prepared folder does not have
    tasks = recipe.data.tasks or meta["tasks"]
    union = METHODS[recipe.method.name].union  # one pass over all tasks' clips
    schedule = [("all", tasks)] if union else [(t, [t]) for t in tasks]
    check_task_sizes(recipe, schedule, world)
    # before the run directory: a bad model.checkpoint leaves none
    method = build_method(recipe, rank, world, device, initial_weights=not resume)
    run_dir = prepare_run_dir(recipe, resume)
    optimizer = build_optimizer(method, recipe.optim)
    amp = amp_dtype(recipe.optim.amp, device)
    scaler = grad_scaler(amp, device)
    wrapped = wrap(method, device, world)
    trainer = Trainer(recipe, run_dir, wrapped, optimizer, scaler, device, rank, world, amp, schedule, tasks,
                      Position(), quiet=quiet, stop_after=stop_after)
    if resume:
        trainer.load(run_dir / "checkpoints" / LATEST)
        log(f"resumed {run_dir} at step {trainer.pos.step} (task {trainer.pos.task + 1}/{len(schedule)}, "
            f"epoch {trainer.pos.epoch + 1}, batch {trainer.pos.batch})")
    if is_main():  # a resumed run's curves go on from the checkpoint's step (a killed run's later lines: dropped)
        trainer.metrics = MetricsLog(run_dir, recipe.train.log_to, recipe_to_dict(recipe),
                                     trainer.pos.step if resume else None, len(trainer.pos.history))
    previous = {s: signal.signal(s, lambda *_: setattr(trainer, "stop_requested", True))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.run()
    except WriteFailed as err:  # a full disk: the last good checkpoint and how to continue from it
        raise err.with_advice(
            f"the last good checkpoint {trainer.last_good} is untouched: make room and continue with "
            f"`{resume_command()}`" if trainer.last_good else
            "no checkpoint was written yet: make room and start again (the run directory is reused)") from err
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if trainer.metrics is not None:
            trainer.metrics.close()
    return run_dir


def resume_command() -> str:
    """This `stella train` command with --resume: what continues the run."""
    args = sys.argv[1:] if sys.argv[1:2] == ["train"] else ["train", "RECIPE"]
    return " ".join(["stella", *map(shlex.quote, args), *([] if "--resume" in args else ["--resume"])])


def check_task_sizes(recipe: Recipe, schedule: list[tuple[str, list[str]]], world: int) -> None:
    """Every task of the stream must give each process at least one full batch, and the retrieval gallery must not
    be empty: checked before the first step, not when the loop reaches the task hours later."""
    root = Path(recipe.data.root)
    batch = per_rank_batch(recipe.train, world)
    rows = read_manifest(root, "train")
    for name, tasks in schedule:
        n = sum(r["task"] in tasks for r in rows)
        if num_batches(n, batch, drop_last=True, world_size=world) == 0:
            over = f" over {world} processes" if world > 1 else ""
            raise StellaError(f"task {name!r}: {n} training clips in {root / 'train.csv'}, fewer than one batch "
                              f"(train.batch_size={recipe.train.batch_size}{over}); lower train.batch_size, or "
                              f"prepare more clips")
    if recipe.eval.retrieval and not read_manifest(root, "retrieval"):
        raise StellaError(f"{root / 'retrieval.csv'}: no retrieval clips; prepare them, or set eval.retrieval=false")


def changed_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested recipe dicts."""
    out = []
    for key in a:
        if isinstance(a[key], dict):
            out += changed_keys(a[key], b[key], f"{prefix}{key}.")
        elif a[key] != b[key]:
            out.append(f"{prefix}{key}")
    return out
