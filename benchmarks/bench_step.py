"""Training-step time of STELLA vs a DER++-style full-clip step, now and at a git ref (before), in one process.

    python benchmarks/bench_step.py [--preset base] [--batch 2] [--rounds 3] [--before REF] [--no-bf16]
    python benchmarks/bench_step.py --score-only --no-bf16      # the frozen scoring passes alone, now vs before

All steps train on B current + B replayed clips at the paper's input sizes (4 x 224² frames, 1024 x 128 fbank)
and time forward + backward (the Adam update is the same for all: it is left out, so the weights stay fixed and
every round repeats the same work):
- DER++ (baselines.md §2.4): one full MAE + contrastive pass with random masking on [X_t; X_m], plus
  0.5 · (MSE(z_a) + MSE(z_v)) of the replayed rows against stored targets;
- STELLA now (stella.Stella.step, method.md §3): frozen scoring passes, the AVM's matching loss, selection,
  the core-patch pass and the penalty; its buffer is filled by a warm-up step, so the timed steps replay;
- STELLA before: the Stella class of the git ref (its Stella.score, with the matching loss's own joint pass);
- STELLA now, frozen_bf16: `method.stella.frozen_bf16` (the frozen passes under bf16 autocast, not bit-identical).
One backbone serves every row; the rows alternate step by step (the order rotating per round) and the median
round is reported, so a busy machine slows them alike: compare the ratios. Now and before see the same batches
and seeds: their losses are compared for bit-identity at every step; frozen_bf16's differences are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from before import BEFORE_SPEED, module, tree  # benchmarks/before.py
from stella_cli import checkpoint, stella
from stella_cli.config import AVMConfig, MethodConfig, ModelConfig, StellaConfig, resolve_model_preset
from stella_cli.model import CAVMAE

SIZES = dict(num_frames=4, image_size=224, target_length=1024, num_mel_bins=128)  # the paper's inputs


def clips(B: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(B, 4, 3, 224, 224, generator=g), "audio": torch.randn(B, 1, 1024, 128, generator=g),
            "label": torch.arange(B), "task": torch.zeros(B, dtype=torch.long), "index": torch.arange(B) + seed * B}


def derpp_step(backbone: CAVMAE, B: int):
    g = torch.Generator().manual_seed(1)
    stored = {k: torch.randn(B, backbone.embed_dim, generator=g) for k in ("z_a", "z_v")}
    replayed = clips(B, 10_000)

    def step(batch: dict) -> dict:
        out = backbone(torch.cat([batch["audio"], replayed["audio"]]), torch.cat([batch["video"], replayed["video"]]),
                       generator=g)
        pen = 0.5 * (torch.nn.functional.mse_loss(out["z_a"][B:], stored["z_a"])
                     + torch.nn.functional.mse_loss(out["z_v"][B:], stored["z_v"]))
        return {k: out[k] for k in ("loss_mae_a", "loss_mae_v", "loss_con")} | {"loss_pen": pen}
    return step


def stella_step(stella_cls, backbone: CAVMAE, B: int, **stella_options):
    torch.manual_seed(1)  # the same AVM initialisation for every STELLA row
    method = stella_cls(backbone, MethodConfig(name="stella", stella=StellaConfig(**stella_options)),
                        avm_cfg=AVMConfig(), batch_size=B, memory_per_rank=8, seed=0, rank=0,
                        device=torch.device("cpu"))
    method.step(clips(B, 0))  # warm-up: fills the buffer, so the timed steps replay
    return method.step, method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=2, help="current clips per step (as many are replayed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE_SPEED, help="git ref of the 'before' code ('' = leave out)")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the method.stella.frozen_bf16 row")
    parser.add_argument("--score-only", action="store_true",
                        help="time only STELLA's frozen scoring (Stella.score, steps A-D): now vs before")
    args = parser.parse_args()
    B = args.batch
    torch.manual_seed(0)
    backbone = CAVMAE(resolve_model_preset(ModelConfig(preset=args.preset)), **SIZES)
    rows = {"DER++ full clip": derpp_step(backbone, B)}
    modules = {"STELLA now": stella.Stella}
    if args.before:  # the ref's Stella (stella.py, or methods.py before the redesign); its imports resolve to this tree
        has_stella_py = (tree(args.before) / "stella_cli" / "stella.py").is_file()
        old = module(args.before, "stella_cli/stella.py" if has_stella_py else "stella_cli/methods.py", "stella_before",
                     moved={"stella_cli.model": {"load_authors_checkpoint": checkpoint.load_authors_checkpoint}})
        modules[f"STELLA before ({args.before})"] = old.Stella
    owners = []
    for name, cls in modules.items():
        rows[name], owner = stella_step(cls, backbone, B)
        owners.append(owner)
    if not args.no_bf16:
        rows["STELLA now, frozen_bf16"], owner = stella_step(stella.Stella, backbone, B, frozen_bf16=True)
        owners.append(owner)
    rows["DER++ full clip"](clips(B, 0))  # warm-up
    if args.score_only:  # the frozen passes alone, where the shared joint pass is saved
        del rows["DER++ full clip"]
        for name, owner in zip([k for k in rows], owners):
            rows[name] = lambda batch, m=owner: {"loss_vam": m.score(batch["audio"], batch["video"])["loss_vam"]}
    names = list(rows)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    losses: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            terms = rows[k](clips(B, 1 + r))
            sum(terms.values()).backward()
            seconds[k].append(time.perf_counter() - start)
            for m in [backbone, *owners]:
                m.zero_grad(set_to_none=True)
            losses[k].append({n: float(v.detach()) for n, v in terms.items()})
            print(f"round {r + 1}: {k}: {seconds[k][-1]:.2f} s", file=sys.stderr, flush=True)
    sec = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"preset {args.preset}, B = {B} current + {B} replayed, paper input sizes, CPU {torch.get_num_threads()} "
          f"thread(s), fp32, forward + backward; median of {args.rounds} interleaved rounds")
    print(f"| {'step' if not args.score_only else 'Stella.score':<28} | {'seconds':>8} | {'/ ' + names[0][:6]:>8} | "
          f"{'best round ratio':>18} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 20}|")
    for k in names:
        best = min(seconds[k]) / min(seconds[names[0]])
        print(f"| {k:<28} | {sec[k]:>8.2f} | {sec[k] / sec[names[0]]:>8.3f} | {best:>18.3f} |")
    failed = False
    if args.before:
        before = next(k for k in names if k.startswith("STELLA before"))
        same = losses["STELLA now"] == losses[before]
        failed = not same
        print(f"STELLA losses now == before at every step: {same} (first: " + ", ".join(
            f"{n} {v:.9g}" for n, v in losses["STELLA now"][0].items()) + ")")
    if not args.no_bf16 and not args.score_only:
        ref, bf = losses["STELLA now"][0], losses["STELLA now, frozen_bf16"][0]
        print("frozen_bf16 - fp32, first timed step (not bit-identical by design): "
              + ", ".join(f"{n} {bf[n] - ref[n]:+.2e}" for n in ref))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
