"""One MAE + contrastive step of the base backbone on CPU: full inputs (random masking) vs core patches.

    python benchmarks/bench_model.py [--batch 2] [--repeats 1] [--core-ratio 0.5] [--preset base] [--attention math]

Each case runs in a fresh subprocess so that its RSS is its own. Reported per case: forward+backward time (median
of --repeats steps after one warm-up step), the bytes of the distinct non-parameter tensors autograd saves for
backward in the warm-up step (activation memory, fp32), the RSS growth after its forward (graph alive) and the peak
RSS growth over it (this includes the parameter gradients, 4 bytes x parameters, the same in both cases). The last
column gives core / full. method.md §8 explains where the saving comes from (the decoder runs on K instead of L tokens).
--attention math replaces scaled_dot_product_attention by the authors' explicit softmax(q·kᵀ)·v, which keeps the
attention maps for backward (the setting of method.md §8's measurement). The kernel switch, the saved-bytes count and
the input sizes are `stella bench`'s (stella_cli/bench.py), which compares whole training iterations of methods.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from stella_cli.bench import SIZES, SavedBytes, attention_kernel, peak_rss_bytes, rss_bytes
from stella_cli.config import MODEL_PRESETS, ModelConfig, num_core_tokens, resolve_model_preset
from stella_cli.model import CAVMAE, audio_patches, video_patches
from stella_cli.select import gather_patches


def rss_mib() -> float:
    return rss_bytes() / 2**20


def run_case(case: str, preset: str, batch: int, repeats: int, core_ratio: float, attention: str) -> dict:
    with attention_kernel(attention):
        return _run_case(case, preset, batch, repeats, core_ratio)


def _run_case(case: str, preset: str, batch: int, repeats: int, core_ratio: float) -> dict:
    torch.manual_seed(0)
    cfg = resolve_model_preset(ModelConfig(preset=preset))
    model = CAVMAE(cfg, **SIZES)
    g = torch.Generator().manual_seed(1)
    audio, video = torch.randn(batch, 1, 1024, 128, generator=g), torch.randn(batch, 4, 3, 224, 224, generator=g)
    ids_a = ids_v = None
    if case == "core":
        L_A, L_V = model.num_audio_tokens, model.num_video_tokens
        ids_a = torch.stack([torch.randperm(L_A, generator=g) for _ in range(batch)])
        ids_v = torch.stack([torch.randperm(L_V, generator=g) for _ in range(batch)])
        audio = gather_patches(audio_patches(audio, 16), ids_a, num_core_tokens(L_A, core_ratio))
        video = gather_patches(video_patches(video, 16), ids_v, num_core_tokens(L_V, core_ratio))
    rss: list[float] = []

    def step() -> float:
        start = time.perf_counter()
        out = model(audio, video, ids_a, ids_v, generator=torch.Generator().manual_seed(2))
        rss.append(rss_mib())
        (out["loss_mae_a"] + out["loss_mae_v"] + out["loss_con"]).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    rss_before = rss_mib()
    with SavedBytes(exclude=model.parameters()) as saved:
        step()  # warm-up, also the one whose saved tensors and RSS are measured
    peak = peak_rss_bytes() / 2**20
    times = [step() for _ in range(repeats)]
    return {"case": case, "seconds": statistics.median(times), "saved_mib": saved.total / 2**20,
            "forward_rss_growth_mib": rss[0] - rss_before, "peak_rss_growth_mib": peak - rss_before,
            "audio_input": list(audio.shape), "video_input": list(video.shape), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", choices=tuple(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--core-ratio", type=float, default=0.5)
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "math"))
    parser.add_argument("--case", choices=("full", "core"), help="internal: run one case and print JSON")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.preset, args.batch, args.repeats, args.core_ratio, args.attention)))
        return
    results = {}
    for case in ("full", "core"):
        cmd = [sys.executable, __file__, "--case", case, "--preset", args.preset, "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--core-ratio", str(args.core_ratio), "--attention", args.attention]
        results[case] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    full, core = results["full"], results["core"]
    print(f"preset {args.preset}, batch {args.batch}, CPU ({full['threads']} threads), fp32, attention "
          f"{args.attention}, one MAE+contrastive step")
    print(f"full: audio {full['audio_input']} video {full['video_input']} (random masking 0.8)")
    print(f"core: audio {core['audio_input']} video {core['video_input']} (core ratio {args.core_ratio})")
    print(f"| {'measure':<34} | {'full inputs':>12} | {'core patches':>12} | {'core / full':>11} |")
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 14}|{'-' * 13}|")
    for key, label in (("seconds", "forward+backward (s)"), ("saved_mib", "saved for backward (MiB)"),
                       ("forward_rss_growth_mib", "RSS growth after forward (MiB)"),
                       ("peak_rss_growth_mib", "peak RSS growth, with grads (MiB)")):
        print(f"| {label:<34} | {full[key]:>12.2f} | {core[key]:>12.2f} | {core[key] / full[key]:>11.3f} |")


if __name__ == "__main__":
    main()
