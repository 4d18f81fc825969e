"""The synthetic audio-visual benchmark behind `stella prep synthetic` (docs/design.md, "The synthetic benchmark").

A small stream in which the two things STELLA exploits really happen (method.md §3):

* sparse spatio-temporal audio-visual correlation: in every clip the sounding object covers a small part of each
  frame and moves, silent distractor objects of other categories (of this and of other tasks) clutter the frame,
  and the category's sound is present only in an event window over background noise, sometimes with an
  off-screen distractor sound;
* forgetting: C categories split into T tasks learnt in a fixed order, with past categories reappearing as
  silent distractors and their pitches interleaved with the current ones.

A category has a visual identity (shape x colour x texture) and a sound identity (harmonic complex with its own
pitch, timbre and temporal modulation); both are fixed by the class index, so the seed only changes the clips.
Every random choice of a clip comes from a numpy Generator seeded by (seed, split, class, k): the cache does not
depend on the worker count, and clip k of a class is the same whatever the clips-per-class setting.

Clips go through the same layout and cache as real clips (cache.py): frames, fbank (audio.clip_fbank) and the
ground truth, i.e. the sounding object's box per frame (`cache/{split}/boxes.npy`, x0, y0, x1, y1 in [0, 1]),
the event window (manifest `event_start` / `event_end`, seconds) and the objects of each clip
(`cache/{split}/objects.npy`, int16 (N, 2 + num_distractors): sounding class, distractor classes, off-screen
class or -1).  `--format mp4` writes real H.264/AAC files and prepares them through the decoding path (prep.py).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from stella_cli import prep
from stella_cli.audio import clip_fbank, one_torch_thread
from stella_cli.cache import (DONE, SPLITS, CacheSpec, SplitWriter, disk_bytes, read_meta, spec_to_dict, write_manifest,
                              write_meta)
from stella_cli.errors import StellaError
from stella_cli.files import atomic_write_text, make_dir, replacing, write_failures
from stella_cli.media import write_mp4
from stella_cli.pool import run_jobs

SPLIT_CODE = {"train": 0, "test": 1, "retrieval": 2}
GENERATOR_VERSION = 3  # bump when a change alters the generated clips or the default benchmark (3: 20 retrieval
# clips per class, a gallery of 400; the clips of version 2 are unchanged, its gallery held their first 5 per class)

SHAPES = ("disc", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {"red": (225, 35, 35), "green": (40, 195, 60), "blue": (45, 90, 245), "yellow": (240, 215, 35),
           "magenta": (215, 45, 215), "cyan": (35, 215, 225), "orange": (250, 135, 15), "white": (240, 240, 240)}
TEXTURES = ("solid", "striped")
TIMBRES = ("bright", "odd", "dark")  # harmonic amplitudes 1/k; odd harmonics only, 1/k; 1/k^2
MODULATIONS = ("steady", "tremolo", "pulse", "vibrato")
MAX_CLASSES = 48  # (shape, colour, texture) stays unique up to here


@dataclass(frozen=True)
class SynthConfig:
    """Generator settings (written into meta.json under `generator.config`)."""

    num_classes: int = 20
    num_tasks: int = 5  # tasks of num_classes / num_tasks consecutive classes, learnt in this order
    train_per_class: int = 32
    test_per_class: int = 8
    # the protocol's 5 per class would make a gallery of 100 clips, where one retrieved clip moves R@1 by a whole
    # point and seeds differ by more than methods do (README "The synthetic table"): 20 per class, 400 clips
    retrieval_per_class: int = 20
    frame_size: int = 64  # S of the cache (contract with recipes/synthetic.yaml)
    fps: float = 8.0
    clip_seconds: float = 4.0  # 32 frames
    sample_rate: int = 16000
    target_length: int = 384  # fbank frames (3.84 s)
    num_mel_bins: int = 128
    num_distractors: int = 2  # silent objects of other classes in every clip
    object_size: float = 0.3  # sounding sprite side / frame side (19 px of 64: its box is ~9% of the frame)
    distractor_size: float = 0.15  # silent distractors' side / frame side (10 px: ~2% of the frame each)
    size_jitter: float = 0.15  # side x U(1 - j, 1 + j) per object
    speed: tuple[float, float] = (0.08, 0.25)  # frame sides per second, bouncing off the borders
    event_seconds: tuple[float, float] = (1.5, 2.5)  # duration of the sounding event (of the 3.84 s heard)
    snr_db: tuple[float, float] = (3.0, 12.0)  # event vs background noise (RMS over the event window)
    offscreen_prob: float = 0.5  # chance of an off-screen distractor sound (a class not in the frame)
    offscreen_gain_db: tuple[float, float] = (-12.0, -6.0)  # its level relative to the event
    f0_range: tuple[float, float] = (180.0, 1400.0)  # pitches of the classes, log-spaced
    f0_jitter: float = 0.02  # per-clip pitch x U(1 - j, 1 + j) (half a pitch step is ~5%)

    @property
    def num_frames(self) -> int:
        return int(round(self.clip_seconds * self.fps))

    @property
    def classes_per_task(self) -> int:
        return self.num_classes // self.num_tasks

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "test": self.test_per_class,
                "retrieval": self.retrieval_per_class}[split]

    def validate(self) -> None:
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"SynthConfig.num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")
        if self.num_tasks < 1 or self.num_classes % self.num_tasks:
            raise ValueError(f"SynthConfig.num_classes={self.num_classes} is not divisible by "
                             f"num_tasks={self.num_tasks}")
        if self.num_distractors + 2 > self.num_classes:
            raise ValueError(f"SynthConfig.num_distractors={self.num_distractors} needs at least "
                             f"{self.num_distractors + 2} classes")
        if min(self.train_per_class, self.test_per_class, self.retrieval_per_class) < 1:
            raise ValueError("SynthConfig: every split needs at least one clip per class")
        if self.event_seconds[1] > self.audible_seconds:
            raise ValueError(f"SynthConfig.event_seconds={self.event_seconds} is longer than the "
                             f"{self.audible_seconds:.2f} s the fbank covers")

    @property
    def audible_seconds(self) -> float:
        """The part of the clip the cut fbank covers (10 ms shift), where events are placed."""
        return min(self.clip_seconds, self.target_length * 0.01)


def cache_spec(cfg: SynthConfig, frames_format: str = "raw") -> CacheSpec:
    """What one synthetic clip holds in the cache (32 frames of 64 x 64 at 8 fps, 384 x 128 fbank)."""
    return CacheSpec(num_frames=cfg.num_frames, frame_size=cfg.frame_size, fps=cfg.fps,
                     clip_seconds=cfg.clip_seconds, sample_rate=cfg.sample_rate, target_length=cfg.target_length,
                     num_mel_bins=cfg.num_mel_bins, frames_format=frames_format)


# ----------------------------------------------------------------------------------------------------------
# category identities (fixed by the class index)


@dataclass(frozen=True)
class Identity:
    name: str
    task: str
    shape: str
    colour: str
    texture: str
    f0: float  # Hz
    timbre: str
    modulation: str
    mod_rate: float  # Hz (tremolo / pulse / vibrato rate)


def task_names(cfg: SynthConfig) -> list[str]:
    return [f"task{t + 1}" for t in range(cfg.num_tasks)]


def class_identities(cfg: SynthConfig) -> list[Identity]:
    """Visual and sound identity of every class.

    Consecutive classes (one task) differ in shape and colour; (shape, colour, texture) is unique.  Pitch ranks
    interleave the tasks (class c of task t gets rank c_in_task * T + t), so every task spans the whole pitch
    range and its neighbours in pitch belong to other tasks: learning a new task disturbs the old ones.
    """
    cfg.validate()
    C, T, per = cfg.num_classes, cfg.num_tasks, cfg.classes_per_task
    lo, hi = cfg.f0_range
    pitches = lo * (hi / lo) ** (np.arange(C) / max(C - 1, 1))
    out = []
    for c in range(C):
        shape, colour = SHAPES[c % len(SHAPES)], list(COLOURS)[c % len(COLOURS)]
        texture = TEXTURES[(c // 24 + c // 3) % 2]  # differs between c and c + 24, whose shape and colour repeat
        modulation = MODULATIONS[(c // 3) % len(MODULATIONS)]
        mod_rate = {"steady": 0.0, "tremolo": 3.0 + 2.0 * (c % 3), "pulse": 2.0 + 0.5 * (c % 3),
                    "vibrato": 5.0 + (c % 3)}[modulation]
        name = f"{'striped_' if texture == 'striped' else ''}{colour}_{shape}"
        out.append(Identity(name=name, task=f"task{c // per + 1}", shape=shape, colour=colour, texture=texture,
                            f0=float(pitches[(c % per) * T + c // per]), timbre=TIMBRES[c % len(TIMBRES)],
                            modulation=modulation, mod_rate=mod_rate))
    return out


# ----------------------------------------------------------------------------------------------------------
# clip plans: every random choice of a clip, drawn from its own Generator


@dataclass(frozen=True)
class ObjectPlan:
    cls: int
    side: float  # px
    cx: float  # centre at t = 0, px
    cy: float
    vx: float  # px / s
    vy: float


@dataclass(frozen=True)
class ClipPlan:
    label: int
    objects: tuple[ObjectPlan, ...]  # objects[0] is the sounding object, the rest are silent distractors
    event: tuple[float, float]  # seconds
    offscreen: int  # class of the off-screen sound, -1 for none
    offscreen_event: tuple[float, float]
    f0_scale: float
    offscreen_f0_scale: float
    snr_db: float
    offscreen_gain_db: float
    noise_tilt: float  # background noise power ~ 1 / f^tilt
    background: tuple[tuple[float, float, float], tuple[float, float, float]]  # two RGB colours of the gradient
    background_angle: float
    audio_seed: int  # harmonic phases and noise samples

    @property
    def distractors(self) -> tuple[int, ...]:
        return tuple(o.cls for o in self.objects[1:])


def clip_rng(seed: int, split: str, label: int, k: int) -> np.random.Generator:
    """The Generator of clip k of class `label` in `split` (independent of workers and clips per class)."""
    return np.random.default_rng([seed, SPLIT_CODE[split], label, k])


def plan_clip(cfg: SynthConfig, seed: int, split: str, label: int, k: int) -> ClipPlan:
    """Every random choice of clip k of class `label`: objects and their motion, event window, sounds, noise."""
    rng = clip_rng(seed, split, label, k)
    S = cfg.frame_size
    others = [c for c in range(cfg.num_classes) if c != label]
    distractors = [int(c) for c in rng.choice(others, size=cfg.num_distractors, replace=False)]
    objects = []
    for i, cls in enumerate([label] + distractors):
        size = cfg.object_size if i == 0 else cfg.distractor_size
        side = size * S * rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter)
        cx, cy = rng.uniform(side / 2, S - side / 2, size=2)
        speed, angle = rng.uniform(*cfg.speed) * S, rng.uniform(0, 2 * np.pi)
        objects.append(ObjectPlan(int(cls), float(side), float(cx), float(cy), float(speed * np.cos(angle)),
                                  float(speed * np.sin(angle))))
    event = _draw_window(rng, cfg)
    silent = [c for c in others if c not in distractors]
    has_offscreen = rng.uniform() < cfg.offscreen_prob and bool(silent)
    offscreen = int(rng.choice(silent)) if has_offscreen else -1
    offscreen_event = _draw_window(rng, cfg)
    j = cfg.f0_jitter
    return ClipPlan(
        label=label, objects=tuple(objects), event=event, offscreen=offscreen, offscreen_event=offscreen_event,
        f0_scale=float(rng.uniform(1 - j, 1 + j)), offscreen_f0_scale=float(rng.uniform(1 - j, 1 + j)),
        snr_db=float(rng.uniform(*cfg.snr_db)), offscreen_gain_db=float(rng.uniform(*cfg.offscreen_gain_db)),
        noise_tilt=float(rng.uniform(0.5, 1.5)),
        background=(tuple(float(v) for v in rng.uniform(15, 100, 3)),
                    tuple(float(v) for v in rng.uniform(15, 100, 3))),
        background_angle=float(rng.uniform(0, 2 * np.pi)), audio_seed=int(rng.integers(2**62)))


def _draw_window(rng: np.random.Generator, cfg: SynthConfig) -> tuple[float, float]:
    duration = rng.uniform(*cfg.event_seconds)
    start = rng.uniform(0, cfg.audible_seconds - duration)
    return float(start), float(start + duration)


def object_centres(obj: ObjectPlan, cfg: SynthConfig) -> np.ndarray:
    """(F, 2) centre (x, y) in px at the frame times i / fps: straight motion, reflected at the borders."""
    t = np.arange(cfg.num_frames) / cfg.fps
    lo, hi = obj.side / 2, cfg.frame_size - obj.side / 2
    out = []
    for p0, v in ((obj.cx, obj.vx), (obj.cy, obj.vy)):
        span = hi - lo
        u = np.mod(p0 - lo + v * t, 2 * span)
        out.append(lo + np.where(u <= span, u, 2 * span - u))  # triangle wave = bouncing
    return np.stack(out, axis=1)


def clip_boxes(plan: ClipPlan, cfg: SynthConfig) -> np.ndarray:
    """float32 (F, 4): the sounding object's box (x0, y0, x1, y1) per frame, in [0, 1] of the frame side."""
    obj = plan.objects[0]
    c = object_centres(obj, cfg)  # (F, 2)
    half = obj.side / 2
    return (np.concatenate([c - half, c + half], axis=1) / cfg.frame_size).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# rendering


def render_video(plan: ClipPlan, cfg: SynthConfig, identities: list[Identity]) -> np.ndarray:
    """uint8 (F, S, S, 3): gradient background, distractors, then the sounding object on top (always visible)."""
    S, F = cfg.frame_size, cfg.num_frames
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5  # pixel centres
    ramp = (xx - S / 2) * np.cos(plan.background_angle) + (yy - S / 2) * np.sin(plan.background_angle)
    ramp = np.clip(0.5 + ramp / S, 0, 1)[..., None]  # (S, S, 1)
    c1, c2 = np.array(plan.background, dtype=np.float32)
    frames = np.broadcast_to(c1 + (c2 - c1) * ramp, (F, S, S, 3)).copy()  # (F, S, S, 3) float32
    F_idx = np.arange(F)[:, None, None]
    for obj in reversed(plan.objects):  # distractors first
        ident = identities[obj.cls]
        half = obj.side / 2
        w = min(int(obj.side) + 3, S)  # window holding the box plus a 1 px margin, same size in every frame
        c = object_centres(obj, cfg)  # (F, 2)
        x0 = np.clip(np.floor(c[:, 0] - half).astype(int) - 1, 0, S - w)  # (F,)
        y0 = np.clip(np.floor(c[:, 1] - half).astype(int) - 1, 0, S - w)
        iy = (y0[:, None] + np.arange(w))[:, :, None]  # (F, w, 1)
        ix = (x0[:, None] + np.arange(w))[:, None, :]  # (F, 1, w)
        u = ((ix + 0.5 - c[:, 0, None, None]) / half).astype(np.float32)  # (F, 1, w), [-1, 1] inside the box
        v = ((iy + 0.5 - c[:, 1, None, None]) / half).astype(np.float32)  # (F, w, 1)
        u, v = np.broadcast_arrays(u, v)  # (F, w, w)
        alpha = np.clip(0.5 - _shape_sdf(ident.shape, u, v) * half, 0, 1)[..., None]  # (F, w, w, 1) coverage
        patch = frames[F_idx, iy, ix]  # (F, w, w, 3)
        frames[F_idx, iy, ix] = patch + (_sprite_colour(ident, u, v) - patch) * alpha
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (in half-sides, < 0 inside) of a shape filling the box [-1, 1]^2."""
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return np.hypot(u, v) - 1
    if shape == "square":
        return np.maximum(au, av) - 1
    if shape == "diamond":
        return (au + av - 1) / np.sqrt(2)
    if shape == "triangle":  # apex at the top (v = -1), base at the bottom (v = 1)
        return np.maximum(v - 1, (au - (v + 1) / 2) / np.sqrt(1.25))
    if shape == "cross":
        return np.minimum(np.maximum(au - 1, av - 0.35), np.maximum(au - 0.35, av - 1))
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.7) - 0.3
    raise ValueError(f"unknown shape {shape!r}")


def _sprite_colour(ident: Identity, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    base = np.array(COLOURS[ident.colour], dtype=np.float32)
    shade = 1.0 - 0.15 * (u + v) / 2  # soft light from the top left
    if ident.texture == "striped":
        shade = shade * np.where(np.sin(np.pi * 2.5 * (u - v)) > 0, 1.0, 0.45)
    return shade[..., None] * base  # (..., 3)


def render_audio(plan: ClipPlan, cfg: SynthConfig, identities: list[Identity]) -> np.ndarray:
    """float32 (n,) mono waveform at cfg.sample_rate: coloured noise + the event (+ an off-screen sound)."""
    sr, n = cfg.sample_rate, int(round(cfg.clip_seconds * cfg.sample_rate))
    rng = np.random.default_rng(plan.audio_seed)
    event_rms = 0.1
    wave = np.zeros(n, dtype=np.float64)
    _add_sound(wave, identities[plan.label], plan.f0_scale, plan.event, event_rms, sr, rng)
    if plan.offscreen >= 0:
        gain = 10 ** (plan.offscreen_gain_db / 20)
        _add_sound(wave, identities[plan.offscreen], plan.offscreen_f0_scale, plan.offscreen_event,
                   event_rms * gain, sr, rng)
    wave += coloured_noise(n, plan.noise_tilt, rng) * event_rms / 10 ** (plan.snr_db / 20)
    peak = np.abs(wave).max()
    if peak > 0.99:  # keep it encodable as audio
        wave *= 0.99 / peak
    return wave.astype(np.float32)


def _add_sound(wave: np.ndarray, ident: Identity, f0_scale: float, window: tuple[float, float], rms: float,
               sr: int, rng: np.random.Generator) -> None:
    """Add the category's harmonic complex, gated to `window` with 20 ms raised-cosine ramps."""
    i0, i1 = int(round(window[0] * sr)), min(int(round(window[1] * sr)), len(wave))
    t = np.arange(i1 - i0) / sr
    f0 = ident.f0 * f0_scale
    f_inst = np.full_like(t, f0)
    if ident.modulation == "vibrato":
        f_inst = f0 * (1 + 0.03 * np.sin(2 * np.pi * ident.mod_rate * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(f_inst) / sr  # (n_w,)
    if ident.timbre == "bright":
        ks, amps = np.arange(1, 11), 1 / np.arange(1, 11)
    elif ident.timbre == "odd":
        ks = np.arange(1, 12, 2)
        amps = 1 / ks
    else:
        ks, amps = np.arange(1, 7), 1 / np.arange(1, 7) ** 2
    keep = ks * f0 * 1.04 < 0.45 * sr  # below Nyquist even with vibrato
    ks, amps = ks[keep], amps[keep]
    offsets = np.exp(1j * rng.uniform(0, 2 * np.pi, len(ks)))
    z, zk = np.exp(1j * phase), np.ones_like(phase, dtype=np.complex128)
    x = np.zeros_like(t)
    for k in range(1, int(ks.max()) + 1):  # harmonic k = Im(a_k e^{i(k phi + theta_k)}), powers of e^{i phi}
        zk *= z
        if k in ks:
            i = int(np.flatnonzero(ks == k)[0])
            x += amps[i] * (zk * offsets[i]).imag
    if ident.modulation == "tremolo":
        x *= 1 - 0.8 * (0.5 + 0.5 * np.sin(2 * np.pi * ident.mod_rate * t + rng.uniform(0, 2 * np.pi)))
    elif ident.modulation == "pulse":
        x *= np.clip(4 * np.sin(2 * np.pi * ident.mod_rate * t) + 0.5, 0, 1)  # beeps, ~60% duty, soft edges
    ramp = min(int(0.02 * sr), len(t) // 2)
    gate = np.ones_like(t)
    gate[:ramp] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    gate[len(t) - ramp:] = gate[:ramp][::-1]
    x *= gate
    wave[i0:i1] += x * rms / max(np.sqrt(np.mean(x**2)), 1e-8)


def coloured_noise(n: int, tilt: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with power spectrum ~ 1 / f^tilt (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spectrum / f ** (tilt / 2), n)
    return x / np.sqrt(np.mean(x**2))


@dataclass
class SynthClip:
    plan: ClipPlan
    frames: np.ndarray  # uint8 (F, S, S, 3)
    wave: np.ndarray  # float32 (n,)
    boxes: np.ndarray  # float32 (F, 4)


def synth_clip(cfg: SynthConfig, seed: int, split: str, label: int, k: int,
               identities: list[Identity] | None = None) -> SynthClip:
    """Generate clip k of class `label` in `split` (pure function of its arguments)."""
    identities = identities or class_identities(cfg)
    plan = plan_clip(cfg, seed, split, label, k)
    return SynthClip(plan, render_video(plan, cfg, identities), render_audio(plan, cfg, identities),
                     clip_boxes(plan, cfg))


def synth_fbank(clip: SynthClip, cfg: SynthConfig) -> np.ndarray:
    """float32 (target_length, num_mel_bins) fbank of a clip, as the cache stores it (audio.clip_fbank)."""
    with one_torch_thread():
        return clip_fbank(clip.wave, cfg.sample_rate, cfg.target_length, cfg.num_mel_bins)


# ----------------------------------------------------------------------------------------------------------
# the benchmark on disk


@dataclass(frozen=True)
class ClipRef:
    row: int
    label: int
    k: int


def split_clips(cfg: SynthConfig, split: str) -> list[ClipRef]:
    """Rows of a split: task-major, then class, then clip k."""
    n = cfg.per_class(split)
    return [ClipRef(c * n + k, c, k) for c in range(cfg.num_classes) for k in range(n)]


def clip_id(split: str, ref: ClipRef) -> str:
    return f"{split}_c{ref.label:02d}_{ref.k:03d}"


def build_meta(cfg: SynthConfig, seed: int, fmt: str, spec: CacheSpec) -> dict[str, Any]:
    """meta.json: the contract keys plus the generator settings, class identities and ground-truth files."""
    identities = class_identities(cfg)
    return {
        "dataset": "synthetic",
        "tasks": task_names(cfg),
        "classes": [{"index": c, "name": ident.name, "category": ident.task, "task": ident.task}
                    for c, ident in enumerate(identities)],
        "spec": spec_to_dict(spec),
        "splits": list(SPLITS),
        "generator": {"version": GENERATOR_VERSION, "seed": seed, "format": fmt, "config": asdict(cfg),
                      "identities": [asdict(i) for i in identities]},
        "ground_truth": {
            "boxes": "cache/{split}/boxes.npy: float32 (N, F, 4) sounding object's box x0, y0, x1, y1 in [0, 1]",
            "event": "manifest event_start / event_end: seconds during which the category is audible",
            "objects": "cache/{split}/objects.npy: int16 (N, 2 + num_distractors): sounding class, silent "
                       "distractor classes, off-screen sound class (-1 = none)",
        },
    }


def manifest_rows(cfg: SynthConfig, seed: int, split: str, fmt: str = "cache") -> list[dict[str, Any]]:
    """Manifest rows of a split (cache.MANIFEST_COLUMNS), with the event window of every clip."""
    identities = class_identities(cfg)
    rows = []
    for ref in split_clips(cfg, split):
        plan = plan_clip(cfg, seed, split, ref.label, ref.k)
        cid = clip_id(split, ref)
        rows.append({"clip_id": cid, "row": ref.row, "label": ref.label, "labels": str(ref.label),
                     "category": identities[ref.label].task, "task": identities[ref.label].task,
                     "duration": cfg.clip_seconds,
                     "source": f"mp4/{split}/{cid}.mp4" if fmt == "mp4" else "synthetic",
                     "event_start": plan.event[0], "event_end": plan.event[1]})
    return rows


def objects_table(cfg: SynthConfig, seed: int, split: str) -> np.ndarray:
    """int16 (N, 2 + num_distractors): sounding class, distractor classes, off-screen sound class (-1 = none)."""
    out = np.full((len(split_clips(cfg, split)), 2 + cfg.num_distractors), -1, dtype=np.int16)
    for ref in split_clips(cfg, split):
        plan = plan_clip(cfg, seed, split, ref.label, ref.k)
        out[ref.row, : 1 + cfg.num_distractors] = [o.cls for o in plan.objects]
        out[ref.row, -1] = plan.offscreen
    return out


def prepare_synthetic(out: str | Path, *, seed: int = 0, fmt: str = "cache", workers: int = 2,
                      frames_format: str = "raw", progress: bool = False,
                      config: SynthConfig | None = None) -> dict[str, Any]:
    """Generate the benchmark into `out` (resumable: rows already done are skipped).

    Returns {'out', 'splits': {split: {task: clips}}, 'skipped': {split: 0}, 'seconds', 'bytes', 'generated'}.
    """
    t0 = time.perf_counter()
    cfg = config or SynthConfig()
    cfg.validate()
    if fmt not in ("cache", "mp4"):
        raise StellaError(f"stella prep synthetic: --format must be 'cache' or 'mp4', got {fmt!r}")
    out = Path(out)
    spec = cache_spec(cfg, frames_format)
    meta = build_meta(cfg, seed, fmt, spec)
    _check_resume(out, meta)
    make_dir(out)
    write_meta(out, meta)
    if fmt == "cache":
        generated, skipped = _generate_cache(out, cfg, seed, spec, workers, progress), {}
    else:
        generated, skipped = _generate_via_mp4(out, cfg, seed, spec, workers, progress)
    tasks = task_names(cfg)
    summary: dict[str, Any] = {"out": str(out), "splits": {}, "skipped": {}}
    report: dict[str, Any] = {"dataset": "synthetic", "warnings": [], "splits": {}}
    for split in SPLITS:
        status = np.load(out / "cache" / split / "status.npy")
        rows = [r for r in manifest_rows(cfg, seed, split, fmt) if status[r["row"]] == DONE]
        write_manifest(out, split, rows)
        with replacing(out / "cache" / split / "objects.npy") as fh:
            np.save(fh, objects_table(cfg, seed, split))
        counts = {t: sum(r["task"] == t for r in rows) for t in tasks}
        summary["splits"][split] = counts
        summary["skipped"][split] = len(skipped.get(split, []))
        report["splits"][split] = {"listed": len(status), "prepared": len(rows), "clips": counts,
                                   "skipped": skipped.get(split, []), "excluded": {}}
    atomic_write_text(out / "prep_report.json", json.dumps(report, indent=2))
    summary.update(seconds=time.perf_counter() - t0, bytes=disk_bytes(out), generated=generated)
    return summary


def _check_resume(out: Path, meta: dict[str, Any]) -> None:
    if not (out / "meta.json").is_file():
        return
    old, new = read_meta(out), json.loads(json.dumps(meta))  # compare as stored (tuples become lists)
    for key in ("dataset", "spec", "generator"):
        if old.get(key) != new[key]:
            raise StellaError(f"{out / 'meta.json'}: the folder was prepared with different {key!r} settings "
                              f"(seed, format or generator); use a new --out folder or delete this one")


def _generate_cache(out: Path, cfg: SynthConfig, seed: int, spec: CacheSpec, workers: int, progress: bool) -> int:
    writers = {s: SplitWriter(out, s, len(split_clips(cfg, s)), spec, with_boxes=True) for s in SPLITS}
    jobs = []
    for split, writer in writers.items():
        refs = split_clips(cfg, split)
        pending = [refs[r] for r in writer.pending_rows()]
        jobs += [(split, pending[i:i + 8]) for i in range(0, len(pending), 8)]
    done = 0
    with tqdm(total=sum(len(j[1]) for j in jobs), disable=not progress, desc="synthetic", unit="clip") as bar:
        for split, rows in _run_jobs(_render_rows, [(str(out), split, spec, cfg, seed, refs) for split, refs in jobs],
                                     workers):
            for r in rows:
                writers[split].mark(r, DONE)
            writers[split].flush()
            done += len(rows)
            bar.update(len(rows))
    return done


def _render_rows(out: str, split: str, spec: CacheSpec, cfg: SynthConfig, seed: int,
                 refs: list[ClipRef]) -> tuple[str, list[int]]:
    """Worker: render clips and write their rows (the parent marks them done)."""
    writer = SplitWriter(Path(out), split, len(split_clips(cfg, split)), spec, with_boxes=True)
    identities = class_identities(cfg)
    for ref in refs:
        clip = synth_clip(cfg, seed, split, ref.label, ref.k, identities)
        writer.write(ref.row, clip.frames, synth_fbank(clip, cfg), clip.boxes)
    return split, [ref.row for ref in refs]


def _generate_via_mp4(out: Path, cfg: SynthConfig, seed: int, spec: CacheSpec, workers: int,
                      progress: bool) -> tuple[int, dict[str, list]]:
    """Write real mp4 files (H.264 + AAC), then prepare them through the decoding path of real clips (prep.py)."""
    jobs = []
    for split in SPLITS:
        make_dir(out / "mp4" / split)
        todo = [r for r in split_clips(cfg, split) if not _mp4_path(out, split, r).is_file()]
        jobs += [(str(out), split, cfg, seed, todo[i:i + 8]) for i in range(0, len(todo), 8)]
    done = 0
    with tqdm(total=sum(len(j[-1]) for j in jobs), disable=not progress, desc="synthetic mp4", unit="clip") as bar:
        for n in _run_jobs(_write_mp4s, jobs, workers):
            done += n
            bar.update(n)
    skipped = {}
    identities = class_identities(cfg)
    for split in SPLITS:
        refs = split_clips(cfg, split)
        clips = [prep.ClipSource(clip_id=clip_id(split, r), source=str(_mp4_path(out, split, r)), label=r.label,
                                 labels=[r.label], category=identities[r.label].task, task=identities[r.label].task)
                 for r in refs]
        res = prep.prepare_split(out, split, clips, spec, workers=workers, progress=progress)
        skipped[split] = res["skipped"]
        writer = SplitWriter(out, split, len(refs), spec, with_boxes=True)  # the decoding path writes no boxes
        for r in refs:
            writer.boxes[r.row] = clip_boxes(plan_clip(cfg, seed, split, r.label, r.k), cfg)
        writer.boxes.flush()
    return done, skipped


def _write_mp4s(out: str, split: str, cfg: SynthConfig, seed: int, refs: list[ClipRef]) -> int:
    identities = class_identities(cfg)
    for ref in refs:
        clip = synth_clip(cfg, seed, split, ref.label, ref.k, identities)
        path = _mp4_path(Path(out), split, ref)
        tmp = path.with_name(path.stem + ".tmp.mp4")
        with write_failures(path, partial=tmp):
            write_mp4(tmp, clip.frames, cfg.fps, clip.wave, cfg.sample_rate)
            os.replace(tmp, path)
    return len(refs)


def _mp4_path(out: Path, split: str, ref: ClipRef) -> Path:
    return out / "mp4" / split / f"{clip_id(split, ref)}.mp4"


def _run_jobs(fn: Any, jobs: list[tuple], workers: int) -> Iterator[Any]:
    """fn(*job) for every job, in this process (workers <= 1, or a single job) or in `workers` processes."""
    yield from run_jobs(_call, [(fn, job) for job in jobs], workers if len(jobs) > 1 else 1)


def _call(fn_job: tuple[Any, tuple]) -> Any:
    fn, job = fn_job
    return fn(*job)


# ----------------------------------------------------------------------------------------------------------
# the held-out domain: the MSR-VTT-style transfer target of `stella eval --task msrvtt`
#
# MSR-VTT is a new audio-video domain after the continual stream (method.md §6.3). Its synthetic analogue is
# generated by the same generator with other settings, into its own folder (`OUT/heldout` beside the
# benchmark, whose files stay untouched):
#
# * new categories: a 40-class generator whose second task holds classes 20..39, whose (shape, colour, texture)
#   never occur among the benchmark's classes 0..19, and whose pitches sit on another 40-step scale; only that task
#   (`task2`) is used;
# * a different rendering: a larger, faster sounding object, louder background noise, longer events and a wider
#   pitch range.
# Splits: train (16 clips per class, the 15 transfer epochs) and retrieval (5 per class, the zero-shot test list);
# the generator's test split holds one clip per class and is not used.


HELDOUT_TASKS = ["task2"]  # the new categories
HELDOUT_CONFIG = replace(
    SynthConfig(), num_classes=40, num_tasks=2, train_per_class=16, test_per_class=1, retrieval_per_class=5,
    object_size=0.4, speed=(0.25, 0.45), snr_db=(0.0, 8.0), event_seconds=(2.0, 3.0), f0_range=(140.0, 2000.0))


def heldout_dir(benchmark: str | Path) -> Path:
    return Path(benchmark) / "heldout"


def prepare_heldout(out: str | Path, *, seed: int = 0, workers: int = 2, frames_format: str = "raw",
                    progress: bool = False) -> dict[str, Any]:
    """Generate the held-out domain into `out` (resumable, like prepare_synthetic)."""
    return prepare_synthetic(out, seed=seed, fmt="cache", workers=workers, frames_format=frames_format,
                             progress=progress, config=HELDOUT_CONFIG)
