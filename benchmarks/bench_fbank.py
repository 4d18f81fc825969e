"""Kaldi fbank clips/s: ours now, ours at a git ref (before), torchaudio; clip by clip and batched.

    python benchmarks/bench_fbank.py [--before REF] [--clips 64] [--rounds 5] [--torchaudio-python PY]

Input: `--clips` 10 s clips at 16 kHz (float32, noise + tones, seed 0), CAV-MAE's loader call on each: mean
removal, fbank (128 mel, 25 / 10 ms, hanning), zero-pad to 1024 frames (`audio.clip_fbank`). Rows:
- clip by clip: one call per clip (what `stella prep` does);
- batched: one call on all clips, (N, S);
- torchaudio: `torchaudio.compliance.kaldi.fbank` with CAV-MAE's arguments on each float32 clip, run by
  `--torchaudio-python` (default `.venv-torchaudio/bin/python`, built as docs/design.md "Audio features" says; the row is
  left out when it is missing: torchaudio does not import beside this venv's torch).
All on one torch thread, as prep runs it. The variants are interleaved (one of each per round, the order rotating)
and the median round is reported (and the best round, the least disturbed on a busy machine): compare the
ratios, not the clips/s.
The script also checks that the outputs of now and before are bit-identical, batched and clip by clip.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from before import BEFORE_SPEED, ROOT, module  # benchmarks/before.py
from stella_cli import audio

SR, SECONDS, TARGET = 16000, 10, 1024

TORCHAUDIO_SERVER = r"""
import sys, time, numpy as np, torch, torchaudio
torch.set_num_threads(1)
clips = torch.from_numpy(np.load(sys.argv[1]))  # (N, S) float32
def one(w):  # CAV-MAE's _wav2fbank: mean removal, kaldi fbank, zero-pad to target_length
    w = (w - w.mean())[None]
    f = torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
                                          window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)
    return torch.nn.functional.pad(f, (0, 0, 0, 1024 - f.shape[0]))
one(clips[0])
print("ready", torch.__version__, torchaudio.__version__, flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    for w in clips:
        one(w)
    print(time.perf_counter() - t, flush=True)
"""


def make_clips(n: int) -> np.ndarray:
    g = np.random.default_rng(0)
    t = np.arange(SR * SECONDS) / SR
    clips = [0.1 * g.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * g.uniform(100, 4000) * t) for _ in range(n)]
    return np.stack(clips).astype(np.float32)  # (N, S)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE_SPEED, help="git ref of the 'before' code")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torchaudio-python", type=Path, default=ROOT / ".venv-torchaudio" / "bin" / "python")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(width=150)
    old = module(args.before, "stella_cli/audio.py", "audio_before")
    clips = make_clips(args.clips)

    def by_clip(fbank) -> np.ndarray:
        return np.stack([fbank(c, SR, TARGET) for c in clips])

    now_one, now_batch = by_clip(audio.clip_fbank), audio.clip_fbank(clips, SR, TARGET)
    old_one, old_batch = by_clip(old.clip_fbank), old.clip_fbank(clips, SR, TARGET)
    same = [np.array_equal(now_one, old_one), np.array_equal(now_batch, old_batch), np.array_equal(now_one, now_batch)]
    console.print(f"bit-identical: now = before clip by clip {same[0]}, batched {same[1]}; "
                  f"now batched = clip by clip {same[2]}")
    variants = {
        "now, clip by clip": lambda: by_clip(audio.clip_fbank),
        "now, batched": lambda: audio.clip_fbank(clips, SR, TARGET),
        f"before ({args.before}), clip by clip": lambda: by_clip(old.clip_fbank),
        f"before ({args.before}), batched": lambda: old.clip_fbank(clips, SR, TARGET),
    }
    server = None
    if args.torchaudio_python.exists():
        npy = Path(tempfile.mkdtemp()) / "clips.npy"
        np.save(npy, clips)
        server = subprocess.Popen([str(args.torchaudio_python), "-c", TORCHAUDIO_SERVER, str(npy)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        console.print("torchaudio:", server.stdout.readline().strip())

        def torchaudio_run() -> float:
            server.stdin.write("go\n")
            server.stdin.flush()
            return float(server.stdout.readline())

        variants["torchaudio, clip by clip"] = torchaudio_run
    else:
        console.print(f"no {args.torchaudio_python}: torchaudio row left out (docs/design.md, "Audio features", builds it)")
    names = list(variants)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[k]
            seconds[k].append(fn() if k.startswith("torchaudio") else timed(fn))
    if server:
        server.stdin.close()
        server.wait()
    rate = {k: args.clips / statistics.median(v) for k, v in seconds.items()}
    best = {k: args.clips / min(v) for k, v in seconds.items()}  # the least disturbed round
    ref = rate.get("torchaudio, clip by clip")
    table = Table(title=f"fbank of {args.clips} clips of {SECONDS} s at {SR} Hz, 1 thread, median of "
                        f"{args.rounds} interleaved rounds")
    for col in ("variant", "clips/s", "vs now clip by clip", "vs torchaudio", "best round", "best vs torchaudio"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for k in names:
        table.add_row(k, f"{rate[k]:.0f}", f"{rate[k] / rate['now, clip by clip']:.2f}x",
                      f"{rate[k] / ref:.2f}x" if ref else "-", f"{best[k]:.0f}",
                      f"{best[k] / best['torchaudio, clip by clip']:.2f}x" if ref else "-")
    console.print(table)
    if not all(same):
        sys.exit(1)


if __name__ == "__main__":
    main()
