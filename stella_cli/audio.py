"""Kaldi-compatible log-mel filterbank in plain torch, as CAV-MAE computes it (method.md §7.2).

CAV-MAE (and STELLA after it) reads a clip, removes the waveform mean and calls
`torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=sr, use_energy=False,
window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)`; the fbank is then zero-padded or cut to
`target_length` frames and normalised as (x + 5.081) / 4.4849.  This module reproduces that computation without
torchaudio, on equal-length clips, vectorised over blocks of frames (one unfold view, one rfft per block of ~1 MiB,
so that the working set stays in cache; a batch costs what its clips cost one by one):

    frames   = unfold(waveform, window_size, window_shift)        snip_edges: only whole windows
    frames  -= mean(frames)                                       remove_dc_offset, per frame
    frames   = frames - 0.97 * [frames[0], frames[:-1]]           pre-emphasis, first sample replicated
    frames  *= hann(window_size, symmetric)                       'hanning' window
    power    = |rfft(frames, n_fft)|²                             n_fft = next power of two >= window_size
    fbank    = log(max(power @ mel_banks, eps_float32))           HTK mel scale 1127·ln(1 + f/700), 20 Hz..Nyquist

With use_energy=False and dither=0, htk_compat changes nothing, so it is not a parameter here.  The computation
runs in float64 (filters built in float32, as Kaldi does) and returns float32; parity with torchaudio is <= 1e-3
(tests/test_audio.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

FBANK_MEAN = -5.081  # method.md §7.2: normalised fbank = (x - FBANK_MEAN) / FBANK_STD
FBANK_STD = 4.4849
EPSILON = float(torch.finfo(torch.float32).eps)  # Kaldi's log floor (torchaudio: finfo of the input dtype)


def frame_geometry(
    sample_rate: int, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, round_to_power_of_two: bool = True
) -> tuple[int, int, int]:
    """(window_size, window_shift, n_fft) in samples, truncated to integers exactly as Kaldi/torchaudio do."""
    window_shift = int(sample_rate * frame_shift_ms * 0.001)  # faithful: truncation, 22.05 kHz -> 220 not 220.5
    window_size = int(sample_rate * frame_length_ms * 0.001)
    if window_size < 2 or window_shift < 1:
        raise ValueError(f"sample_rate={sample_rate} gives window {window_size} / shift {window_shift} samples")
    n_fft = 1 << (window_size - 1).bit_length() if round_to_power_of_two else window_size
    return window_size, window_shift, n_fft


def mel_scale(freq: float) -> float:
    """HTK mel scale: 1127 · ln(1 + f / 700)."""
    return 1127.0 * math.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=32)
def mel_banks(
    sample_rate: int, n_fft: int, num_mel_bins: int, low_freq: float, high_freq: float,
    device: torch.device, dtype: torch.dtype,
) -> Tensor:
    """Kaldi's triangular mel filters on the rfft bins: (n_fft // 2 + 1, M); the Nyquist row is zero as in Kaldi.

    Triangles are linear in mel, spaced uniformly between mel(low_freq) and mel(high_freq); high_freq <= 0 means
    Nyquist + high_freq.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"mel range must satisfy 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}..{high_freq}")
    mel_low = mel_scale(low_freq)
    delta = (mel_scale(high_freq) - mel_low) / (num_mel_bins + 1)
    # faithful: Kaldi (BaseFloat) and torchaudio build the filters in float32; doing the same makes our output match
    # torchaudio's to the last bit in float64 (float64 filters would differ by up to ~2e-4 in log-mel).
    m = torch.arange(num_mel_bins, dtype=torch.float32).unsqueeze(1)  # (M, 1)
    left, center, right = mel_low + m * delta, mel_low + (m + 1.0) * delta, mel_low + (m + 2.0) * delta  # (M, 1)
    hz = sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float32)  # (K,) bin frequencies
    bin_mel = (1127.0 * (1.0 + hz / 700.0).log()).unsqueeze(0)  # (1, K)
    up = (bin_mel - left) / (center - left)  # (M, K)
    down = (right - bin_mel) / (right - center)  # (M, K)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (M, K)
    banks = torch.cat([banks, banks.new_zeros(num_mel_bins, 1)], dim=1)  # (M, K + 1): Nyquist bin has no weight
    return banks.T.contiguous().to(device=device, dtype=dtype)  # (K + 1, M)


@functools.lru_cache(maxsize=32)
def hanning_window(window_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Kaldi's 'hanning' window: the symmetric Hann window, 0.5 - 0.5·cos(2πn / (W - 1)).  (W,)"""
    return torch.hann_window(window_size, periodic=False, dtype=torch.float64).to(device=device, dtype=dtype)


def kaldi_fbank(
    waveform: Tensor,
    sample_rate: int,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    *,
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_power: bool = True,
) -> Tensor:
    """torchaudio.compliance.kaldi.fbank's log-mel fbank with CAV-MAE's arguments (method.md §7.2), no mean removal.

    waveform: (S,) or (N, S) float, equal-length clips.  Returns float32 (frames, M) or (N, frames, M), where
    frames = 1 + (S - window) // shift (snip_edges; 0 frames when S < window).  Window 'hanning', dither 0,
    use_energy False (htk_compat is then irrelevant).  Works at any sample rate.
    """
    if not isinstance(waveform, Tensor):
        raise ValueError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if waveform.dim() not in (1, 2) or not waveform.is_floating_point():
        raise ValueError(f"waveform must be float (S,) or (N, S), got {tuple(waveform.shape)} {waveform.dtype}")
    W, shift, n_fft = frame_geometry(sample_rate, frame_length_ms, frame_shift_ms, round_to_power_of_two)
    x = waveform.to(torch.float64)  # float32 rounding would move quiet mel bins by up to ~4e-3
    x = x.unsqueeze(0) if waveform.dim() == 1 else x  # (N, S)
    N, S = x.shape
    if S < W:  # no whole window: Kaldi gives no frames
        fbank = x.new_zeros((N, 0, num_mel_bins), dtype=torch.float32)
        return fbank[0] if waveform.dim() == 1 else fbank
    framed = x.unfold(-1, W, shift)  # (N, F, W), a view: nothing is copied yet
    F_ = framed.shape[1]
    window = hanning_window(W, x.device, x.dtype)
    banks = mel_banks(sample_rate, n_fft, num_mel_bins, float(low_freq), float(high_freq), x.device, x.dtype)
    fbank = torch.empty((N, F_, num_mel_bins), dtype=torch.float32, device=x.device)
    # Every step is per frame, so frames are processed in blocks of about 1 MiB (n_fft · rows · 8 bytes): a block's
    # temporaries stay in cache, and a batch of N clips costs N times one clip (materialising the whole (N, F, W)
    # frames and (N, F, n_fft/2+1) spectrum streamed ~0.5 GB per 64 clips through memory, 2.5-4x slower per clip).
    # The arithmetic per frame is unchanged, so the output is bit-identical whatever the block or batch size.
    rows = min(F_, max(16, (1 << 17) // n_fft))
    padded = x.new_zeros((rows, n_fft))  # (r, n_fft): a block of frames, zero-padded on the right for the FFT
    scaled = x.new_empty((rows, W - 1))  # preemphasis · x[t - 1]
    for n in range(N):
        for start in range(0, F_, rows):
            frames = framed[n, start:start + rows]  # (r, W)
            r = frames.shape[0]
            out = padded[:r, :W]  # (r, W)
            if remove_dc_offset:
                frames = frames - frames.mean(dim=-1, keepdim=True)  # (r, W)
            if preemphasis != 0.0:  # x[t] - 0.97 · x[t - 1], with x[-1] := x[0] as Kaldi
                torch.mul(frames[:, :-1], preemphasis, out=scaled[:r])
                torch.sub(frames[:, 1:], scaled[:r], out=out[:, 1:])
                torch.sub(frames[:, :1], preemphasis * frames[:, :1], out=out[:, :1])
            else:
                out.copy_(frames)
            out.mul_(window)
            spectrum = torch.view_as_real(torch.fft.rfft(padded[:r]))  # (r, n_fft // 2 + 1, 2)
            re, im = spectrum[..., 0], spectrum[..., 1]
            power = re * re + im * im  # (r, K + 1), re² + im² (bit-identical to summing the squares, ~18x faster)
            if not use_power:
                power = power.sqrt()  # magnitude
            fbank[n, start:start + r] = (power @ banks).clamp_min(EPSILON).log()  # (r, M), float64 -> float32
    return fbank[0] if waveform.dim() == 1 else fbank


def pad_or_cut(fbank: Tensor, target_length: int) -> Tensor:
    """Zero-pad at the end or cut the time axis (the last-but-one) to target_length, as CAV-MAE (method.md §7.2).

    fbank: (..., T, M) -> (..., target_length, M).  Padding happens before normalisation, so padded frames are 0.
    """
    if target_length < 1:
        raise ValueError(f"target_length must be >= 1, got {target_length}")
    T = fbank.shape[-2]
    if T >= target_length:
        return fbank[..., :target_length, :]
    return torch.nn.functional.pad(fbank, (0, 0, 0, target_length - T))  # (..., target_length, M)


def clip_fbank(
    waveform: np.ndarray | Tensor, sample_rate: int, target_length: int, num_mel_bins: int = 128
) -> np.ndarray:
    """The fbank that `stella prep` caches: remove the clip mean, kaldi_fbank, pad or cut (method.md §7.2).

    waveform: (S,) or (N, S) float mono clip(s).  Returns float32 (target_length, M) or (N, target_length, M),
    un-normalised (normalize_fbank happens at load time).
    """
    x = torch.as_tensor(waveform)
    if not x.is_floating_point():
        raise ValueError(f"waveform must be float samples in [-1, 1], got dtype {x.dtype}")
    if x.dim() == 2:  # clip by clip into one array: the float64 copy of a whole batch would not stay in cache
        out = np.empty((x.shape[0], target_length, num_mel_bins), dtype=np.float32)
        for i, clip in enumerate(x):
            out[i] = clip_fbank(clip, sample_rate, target_length, num_mel_bins)
        return out
    x = x.to(torch.float64)
    # faithful: CAV-MAE's `waveform - waveform.mean()`; after the per-frame DC removal it only changes rounding
    x = x - x.mean(dim=-1, keepdim=True)
    fbank = kaldi_fbank(x, sample_rate, num_mel_bins)  # (F, M)
    return pad_or_cut(fbank, target_length).numpy(force=True).astype(np.float32, copy=False)


def normalize_fbank(x: Tensor | np.ndarray, mean: float = FBANK_MEAN, std: float = FBANK_STD) -> Tensor | np.ndarray:
    """(x - mean) / std; with the defaults (x + 5.081) / 4.4849 (method.md §7.2)."""
    return (x - mean) / std


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: a clip's fbank is too small to share (extra threads only wait on each other), and
    one thread makes it bit-identical in a parent process and in its workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
