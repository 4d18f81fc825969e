"""Training-step time of STELLA vs a DER++-style full-clip step, now and at a git ref (before).

    python benchmarks/bench_step.py [--preset base] [--batch 2] [--steps 2] [--rounds 2] [--before REF]

Both steps train on B current + B replayed clips at the paper's input sizes (4 x 224² frames, 1024 x 128 fbank)
and include forward, backward and the Adam update:
- DER++ (baselines_spec §2.4): one full MAE + contrastive pass with random masking on [X_t; X_m], plus
  0.5 · (MSE(z_a) + MSE(z_v)) of the replayed rows against stored targets;
- STELLA (methods.Stella.step, stella_spec §3): frozen scoring passes, the AVM's matching loss, selection, the
  core-patch pass and the penalty. Its buffer is filled by a warm-up step, so the timed steps replay.
A third row runs STELLA with `method.stella.frozen_bf16` (the frozen scoring passes under bf16 autocast: faster
on CPUs with bf16 units, not bit-identical; its loss differences to fp32 are printed). Each case runs in a fresh
subprocess; the cases are interleaved (order rotating per round) and the median step is reported, so a busy machine slows them alike: compare the ratios. STELLA's
losses of now and before (same seeds) are printed side by side and must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from before import BEFORE_SPEED, ROOT, tree  # benchmarks/before.py

SIZES = dict(num_frames=4, image_size=224, target_length=1024, num_mel_bins=128)  # the paper's inputs


def clips(B: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(B, 4, 3, 224, 224, generator=g), "audio": torch.randn(B, 1, 1024, 128, generator=g),
            "label": torch.arange(B), "task": torch.zeros(B, dtype=torch.long), "index": torch.arange(B) + seed * B}


def run_case(case: str, preset: str, B: int, steps: int, frozen_bf16: bool = False) -> dict:
    from stella_cli.config import AVMConfig, MethodConfig, ModelConfig, StellaConfig, resolve_model_preset
    from stella_cli.methods import Stella
    from stella_cli.model import CAVMAE

    torch.manual_seed(0)
    backbone = CAVMAE(resolve_model_preset(ModelConfig(preset=preset)), **SIZES)
    if case == "stella":
        stella = StellaConfig(frozen_bf16=True) if frozen_bf16 else StellaConfig()  # before: no such field
        method = Stella(backbone, MethodConfig(name="stella", stella=stella), avm_cfg=AVMConfig(), batch_size=B, memory_per_rank=8,
                        seed=0, rank=0, device=torch.device("cpu"))

        def losses(batch: dict) -> dict:
            return method.step(batch)
    else:
        method, g = backbone, torch.Generator().manual_seed(1)
        stored = {"z_a": torch.randn(B, backbone.embed_dim, generator=g), "z_v": torch.randn(B, backbone.embed_dim,
                                                                                             generator=g)}
        replayed = clips(B, 10_000)

        def losses(batch: dict) -> dict:
            out = backbone(torch.cat([batch["audio"], replayed["audio"]]), torch.cat([batch["video"],
                           replayed["video"]]), generator=g)
            pen = 0.5 * (torch.nn.functional.mse_loss(out["z_a"][B:], stored["z_a"])
                         + torch.nn.functional.mse_loss(out["z_v"][B:], stored["z_v"]))
            return {k: out[k] for k in ("loss_mae_a", "loss_mae_v", "loss_con")} | {"loss_pen": pen}
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    seconds, first = [], None
    for i in range(1 + steps):  # one warm-up step (STELLA: it fills the buffer, so the timed steps replay)
        batch = clips(B, i)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        terms = losses(batch)
        sum(terms.values()).backward()
        opt.step()
        if i >= 1:
            seconds.append(time.perf_counter() - start)
            first = first or {k: float(v) for k, v in terms.items()}
    return {"seconds": statistics.median(seconds), "losses": first, "threads": torch.get_num_threads()}


def subprocess_case(args: argparse.Namespace, case: str, pythonpath: str, *flags: str) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--preset", args.preset, "--batch", str(args.batch),
           "--steps", str(args.steps), *flags]
    env = {**os.environ, "PYTHONPATH": f"{pythonpath}{os.pathsep}{ROOT / 'benchmarks'}"}
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=2, help="current clips per step (as many are replayed)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default=BEFORE_SPEED, help="git ref of the 'before' code ('' = skip)")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the method.stella.frozen_bf16 row")
    parser.add_argument("--case", choices=("derpp", "stella"), help="internal: run one case, print JSON")
    parser.add_argument("--frozen-bf16", action="store_true", help="internal: with method.stella.frozen_bf16")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.preset, args.batch, args.steps, args.frozen_bf16)))
        return
    cases = {"DER++ full clip": ("derpp", str(ROOT)), "STELLA now": ("stella", str(ROOT))}
    if not args.no_bf16:
        cases["STELLA now, frozen_bf16"] = ("stella", str(ROOT), "--frozen-bf16")
    if args.before:
        cases[f"STELLA before ({args.before})"] = ("stella", str(tree(args.before)))
    names = list(cases)
    results: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            results[k].append(subprocess_case(args, *cases[k]))
            print(f"round {r + 1}: {k}: {results[k][-1]['seconds']:.2f} s", file=sys.stderr)
    sec = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    threads = results[names[0]][0]["threads"]
    print(f"preset {args.preset}, B = {args.batch} current + {args.batch} replayed, paper input sizes, CPU "
          f"{threads} thread(s), fp32, forward + backward + Adam; median of {args.rounds} rounds x {args.steps} steps")
    print(f"| {'step':<28} | {'seconds':>8} | {'/ DER++':>8} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|")
    for k in names:
        print(f"| {k:<28} | {sec[k]:>8.2f} | {sec[k] / sec[names[0]]:>8.3f} |")
    stella = [k for k in names if k.startswith("STELLA") and "bf16" not in k]
    for k in stella:
        print(f"{k} losses: " + ", ".join(f"{n} {v:.9g}" for n, v in results[k][0]["losses"].items()))
    if "STELLA now, frozen_bf16" in results:
        ref, bf = results["STELLA now"][0]["losses"], results["STELLA now, frozen_bf16"][0]["losses"]
        print("frozen_bf16 - fp32, same seeds (not bit-identical by design): "
              + ", ".join(f"{n} {bf[n] - ref[n]:+.2e}" for n in ref))
    if len(stella) == 2:
        same = results[stella[0]][0]["losses"] == results[stella[1]][0]["losses"]
        print(f"STELLA losses now == before: {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
