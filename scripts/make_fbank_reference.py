"""Write tests/data/fbank_reference.npz: torchaudio's Kaldi fbank on real speech, noise and tones (issue 2 §3).

torchaudio cannot be installed beside the repository's torch, so this script runs in a separate venv:

    python3 -m venv .venv-torchaudio
    .venv-torchaudio/bin/pip install torch==2.9.1 torchvision==0.24.1
    .venv-torchaudio/bin/pip install torch==2.9.1 'torchaudio==2.9.*'
    .venv-torchaudio/bin/python scripts/make_fbank_reference.py

It never imports stella_cli.  tests/test_audio.py imports this file for the input recipes (`synthetic_waveform`,
`read_wav`) and recomputes every case with stella_cli.audio; torchaudio is imported only in `main`.

Inputs, all 16-bit like the clips CAV-MAE reads (float sample = int16 / 32768, as torchaudio.load returns):
* speech: Debian asterisk-core-sounds-en-wav prompts (8 kHz mono), identified by file name and sha256;
* noise / tones: integer recipes (a splitmix64 counter hash for noise, integer-phase harmonics for tones), quantised
  to int16 and identified by the sha256 of the int16 samples.
Each case stores the reference fbank as float32 (frames, 128):

    ref = max(torchaudio.compliance.kaldi.fbank(w.double(), htk_compat=True, sample_frequency=sr, use_energy=False,
                                                window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10),
              log(finfo(float32).eps))

i.e. CAV-MAE's call evaluated in float64.  The floor is the one torchaudio applies to float32 input (it floors at
the input dtype's eps), so `ref` is CAV-MAE's float32 call without float32 rounding.  Why float64: on mel bins
~80 dB or more below the frame energy (tones, digital silence around a tone), the float32 call is itself off by up
to ~4e-3 (FFT rounding), so no independent implementation can match it to 1e-3 there; the script records that
spread, max |fbank(w float32) - ref|, per case as `torchaudio_float32_spread` in the metadata, and where that spread
is at most STABLE_F32 (real speech without tones, noise, the 'cavmae' clip) it also stores the plain float32 call
itself as `<key>_f32`, so the test checks the exact call CAV-MAE makes on real recorded audio as well.  The 'cavmae' case
runs CAV-MAE's loader steps around the call (w - w.mean(), fbank, zero-pad / cut to target_length).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import wave
from pathlib import Path

import numpy as np

SPEECH_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
SPEECH_FILES = ("ascending-2tone.wav", "time.wav", "vm-pls-try-again.wav", "vm-next.wav")
KALDI_ARGS = dict(
    htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10
)

# (name, kind, sample rate, seconds, seed); 'cavmae' = noise + tones + DC offset through CAV-MAE's loader steps
SYNTHETIC_CASES = (
    ("noise_8000_3.7s", "noise", 8000, 3.7, 1),
    ("noise_22050_1s", "noise", 22050, 1.0, 2),
    ("noise_44100_0.3s", "noise", 44100, 0.3, 3),
    ("noise_48000_1s", "noise", 48000, 1.0, 4),
    ("tone_8000_0.3s", "tone", 8000, 0.3, 5),
    ("tone_16000_1s", "tone", 16000, 1.0, 6),
    ("tone_22050_0.3s", "tone", 22050, 0.3, 7),
    ("tone_44100_1s", "tone", 44100, 1.0, 8),
    ("tone_48000_0.3s", "tone", 48000, 0.3, 9),
    ("cavmae_16000_10s", "cavmae", 16000, 10.0, 10),
)
CAVMAE_TARGET_LENGTH = 1024
STABLE_F32 = 5e-4  # float32-vs-float64 spread below which the plain float32 call is stored as `<key>_f32`
F32_SUFFIX = "_f32"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM wav as float32 int16 / 32768 (what torchaudio.load returns), first channel.  (S,), rate."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * f.getsampwidth()}-bit")
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").reshape(-1, f.getnchannels())
        return pcm[:, 0].astype(np.float32) / 32768.0, f.getframerate()


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 counter: exact integer arithmetic, identical on every platform."""
    z = counter + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform(seed: int, n: int, stream: int) -> np.ndarray:
    """n uniforms in [0, 1) (53-bit, exact) from (seed, stream)."""
    base = np.uint64((seed << 40) + (stream << 32))
    with np.errstate(over="ignore"):
        bits = _splitmix64(np.arange(n, dtype=np.uint64) + base)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _noise(seed: int, n: int) -> np.ndarray:
    """Approximately Gaussian (Irwin-Hall of 4 uniforms), unit variance."""
    return (sum(_uniform(seed, n, k) for k in range(4)) - 2.0) * np.sqrt(3.0)


def _tones(seed: int, n: int, sr: int) -> np.ndarray:
    """Three harmonics of an integer f0 with an integer-period tremolo; phases reduced exactly in integers."""
    f0 = 110 + 37 * seed
    t = np.arange(n, dtype=np.int64)
    x = np.zeros(n)
    for k, amp in ((1, 0.5), (2, 0.25), (3, 0.125)):
        if k * f0 < sr // 2:
            x += amp * np.sin(2.0 * np.pi * ((k * f0 * t) % sr).astype(np.float64) / sr)
    tremolo = 0.75 + 0.25 * np.sin(2.0 * np.pi * ((3 * t) % sr).astype(np.float64) / sr)
    return x * tremolo


def synthetic_waveform(kind: str, sample_rate: int, seconds: float, seed: int) -> np.ndarray:
    """The int16 samples of a synthetic case, bit-exact from (kind, sample_rate, seconds, seed).  (S,) int16"""
    n = int(round(seconds * sample_rate))
    if kind == "noise":
        x = 0.1 * _noise(seed, n)
    elif kind == "tone":
        x = _tones(seed, n, sample_rate)
    elif kind == "cavmae":
        x = 0.3 * _tones(seed, n, sample_rate) + 0.05 * _noise(seed, n) + 0.2  # DC offset: removed by the loader
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}")
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def main() -> None:
    import torch
    import torchaudio
    import torchaudio.compliance.kaldi as ta_kaldi

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speech-dir", type=Path, default=SPEECH_DIR)
    default_out = Path(__file__).resolve().parents[1] / "tests" / "data" / "fbank_reference.npz"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()

    floor = math.log(torch.finfo(torch.float32).eps)

    def fbank(w: np.ndarray, sr: int, remove_mean: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
        """(float64 reference, plain float32 call, max |float32 call - reference|), each (frames, 128)."""
        out = []
        for dtype in (torch.float64, torch.float32):
            wt = torch.from_numpy(w).to(dtype)[None]  # (1, S)
            wt = wt - wt.mean() if remove_mean else wt
            out.append(ta_kaldi.fbank(wt, sample_frequency=sr, **KALDI_ARGS).clamp_min(floor).numpy())
        ref, f32 = out
        return ref.astype(np.float32), f32, float(np.abs(f32.astype(np.float64) - ref).max())

    def keep_f32(key: str, f32: np.ndarray, spread: float) -> bool:
        """Store the exact float32 call too where it is stable to STABLE_F32 (not the tones, see the docstring)."""
        if spread <= STABLE_F32:
            arrays[key + F32_SUFFIX] = f32
        return spread <= STABLE_F32

    cases, arrays = [], {}
    for name in SPEECH_FILES:
        path = args.speech_dir / name
        w, sr = read_wav(path)
        key = "speech_" + name.removesuffix(".wav")
        arrays[key], f32, spread = fbank(w, sr)
        cases.append(dict(key=key, kind="speech", file=name, sha256=sha256_bytes(path.read_bytes()), sample_rate=sr,
                          num_samples=len(w), torchaudio_float32_spread=spread, float32_call=keep_f32(key, f32, spread)))
    for key, kind, sr, seconds, seed in SYNTHETIC_CASES:
        pcm = synthetic_waveform(kind, sr, seconds, seed)
        w = pcm.astype(np.float32) / 32768.0
        case = dict(key=key, kind=kind, sample_rate=sr, seconds=seconds, seed=seed, num_samples=len(pcm),
                    sha256=sha256_bytes(pcm.tobytes()))
        fb, f32, case["torchaudio_float32_spread"] = fbank(w, sr, remove_mean=kind == "cavmae")
        if kind == "cavmae":  # CAV-MAE's loader: mean removal (above), fbank, ZeroPad2d / cut to target_length
            p = CAVMAE_TARGET_LENGTH - fb.shape[0]
            fb = np.pad(fb, ((0, p), (0, 0))) if p > 0 else fb[:CAVMAE_TARGET_LENGTH]
            f32 = np.pad(f32, ((0, p), (0, 0))) if p > 0 else f32[:CAVMAE_TARGET_LENGTH]
            case["target_length"] = CAVMAE_TARGET_LENGTH
        arrays[key] = fb
        case["float32_call"] = keep_f32(key, f32, case["torchaudio_float32_spread"])
        cases.append(case)
    meta = dict(script="scripts/make_fbank_reference.py", torch=torch.__version__, torchaudio=torchaudio.__version__,
                numpy=np.__version__, kaldi_args=KALDI_ARGS, input_scale="int16 / 32768 as float32",
                reference="torchaudio fbank of the float32 samples cast to float64, floored at log(float32 eps)",
                cases=cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, meta=np.array(json.dumps(meta)), **arrays)
    frames = sum(a.shape[0] for a in arrays.values())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {len(cases)} cases, {frames} frames)")
    for case in cases:
        print(f"  {case['key']:28s} torchaudio float32 vs float64: max {case['torchaudio_float32_spread']:.2e}")


if __name__ == "__main__":
    main()
