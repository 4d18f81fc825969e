"""Decoding real clips with PyAV, as the authors' offline extraction does (method.md §7.1).

    frames  80 frames at indices floor(i·N/80), N = min(decoded frames, int(10 s · native fps)):
            8 fps over the first 10 s; a shorter clip spreads the 80 frames over what it has (and repeats
            frames when it has fewer than 80). Each frame: Resize(256) on the short side, CenterCrop(256).
    audio   downmixed to mono and resampled to 16 kHz, the first 10 s (the authors: `ffmpeg -ac 1 -ar 16000`).

Decoding is one demux pass over the first 10 s of both streams; only the sampled frames are resized and kept.
The resize is swscale's bilinear filter, which (like torchvision's Resize on PIL images) widens its support when
it downscales, i.e. it is antialiased. `write_mp4` encodes H.264 (yuv420p) + AAC, for tests and for the synthetic
benchmark's `--format mp4`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

MIN_SECONDS = 1.0  # a clip with less than this much video or audio is "too short"
AUDIO_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


class ClipError(Exception):
    """A clip that cannot be used; `reason` is a short line for prep_report.json."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 (F, S, S, 3) RGB
    waveform: np.ndarray  # float32 (samples,) mono at sample_rate, at most clip_seconds long
    duration: float  # seconds of usable clip: min(N / native fps, audio samples / sample_rate)
    native_fps: float
    num_source_frames: int  # N: the frames the F samples were drawn from


def sample_indices(num_source_frames: int, num_frames: int) -> np.ndarray:
    """Frame indices floor(i·N/F), i = 0..F-1 (method.md §7.1); int64 (F,). N < F repeats frames."""
    return (np.arange(num_frames) * num_source_frames) // num_frames


def resize_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision Resize(size) + CenterCrop(size): (resized_w, resized_h, crop_left, crop_top)."""
    if width <= height:
        rw, rh = size, int(size * height / width)
    else:
        rw, rh = int(size * width / height), size
    return rw, rh, int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))


def decode_clip(
    path: str | Path,
    *,
    fps: float = 8.0,
    num_frames: int = 80,
    frame_size: int = 256,
    clip_seconds: float = 10.0,
    sample_rate: int = 16000,
    min_seconds: float = MIN_SECONDS,
    downmix: str = "ffmpeg",
    threads: int = 0,
) -> DecodedClip:
    """Frames and mono 16 kHz audio of one clip, as the authors extract them (method.md §7.1).

    `fps` is the nominal cache rate (num_frames / clip_seconds); the sampling itself is defined by num_frames and
    clip_seconds. Frame i is source frame floor(i·N/F) as the spec states; the authors' OpenCV loop seeks to that
    index minus one, i.e. reads one frame (1/fps s) earlier, which is not reproduced. downmix "ffmpeg" is
    swresample's mono downmix, what the authors' `ffmpeg -ac 1` applies (stereo: 0.707·(L + R); 5.1: FC +
    0.707·(FL + FR) + 0.5·(BL + BR), LFE dropped); "mean" averages the channels.
    threads: decoder threads (0 = FFmpeg's choice). Raises ClipError: cannot open / no video stream / no audio
    stream / cannot decode / too short (less than min_seconds of video or of audio).
    """
    if downmix not in ("ffmpeg", "mean"):
        raise ValueError(f"downmix must be 'ffmpeg' or 'mean', got {downmix!r}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise ClipError(f"cannot open: {_short(err)}") from err
    with container:
        if not container.streams.video:
            raise ClipError("no video stream")
        if not container.streams.audio:
            raise ClipError("no audio stream")
        vstream, astream = container.streams.video[0], container.streams.audio[0]
        rate = vstream.average_rate or vstream.guessed_rate
        if not rate or float(rate) <= 0:
            raise ClipError("no frame rate")
        native_fps = float(rate)
        limit = int(clip_seconds * native_fps)  # the authors: min(frame count, int(fps * 10))
        guess = min(_frame_count_guess(container, vstream, native_fps), limit)
        frames, count, waveform = _decode_pass(container, vstream, astream, guess, limit, num_frames, frame_size,
                                               clip_seconds, sample_rate, downmix, threads)
    if count < min_seconds * native_fps:
        raise ClipError(f"too short: video {count / native_fps:.2f} s (minimum {min_seconds:g} s)")
    if len(waveform) < min_seconds * sample_rate:
        raise ClipError(f"too short: audio {len(waveform) / sample_rate:.2f} s (minimum {min_seconds:g} s)")
    if count != guess:  # the container misstated its frame count: sample again with the true N
        frames = _decode_frames(path, count, num_frames, frame_size, threads)
    return DecodedClip(frames=frames, waveform=waveform, native_fps=native_fps, num_source_frames=count,
                       duration=min(count / native_fps, len(waveform) / sample_rate))


def decode_frame_folder(
    folder: str | Path,
    audio: str | Path,
    *,
    frames_per_second: float,
    num_frames: int = 80,
    frame_size: int = 256,
    clip_seconds: float = 10.0,
    sample_rate: int = 16000,
    min_seconds: float = MIN_SECONDS,
) -> DecodedClip:
    """A clip released as extracted frames (a folder of images, `{name}_{k}.png` k = 1, 2, ..., at
    `frames_per_second`) and an audio file, sampled as decode_clip samples a video: frame i is image
    floor(i·N/F) of the first N = min(images, int(clip_seconds · frames_per_second)); audio mono 16 kHz, first
    clip_seconds. AVSBench's processed release (visual_frames/ at 1 fps + audio_wav/) is this form."""
    images = sorted((p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")),
                    key=lambda p: (len(p.stem), p.stem))  # name_2 before name_10
    count = min(len(images), int(clip_seconds * frames_per_second))
    if count < min_seconds * frames_per_second:
        raise ClipError(f"too short: video {count / frames_per_second:.2f} s (minimum {min_seconds:g} s)")
    sampler = _FrameSampler(frame_size, num_frames)
    try:
        for k, positions in _wanted(count, num_frames).items():
            with av.open(str(images[k])) as container:
                sampler.take(next(container.decode(video=0)), positions)
        with av.open(str(audio)) as container:
            if not container.streams.audio:
                raise ClipError("no audio stream")
            collector = _AudioCollector(sample_rate, int(round(clip_seconds * sample_rate)), "ffmpeg")
            for frame in container.decode(audio=0):
                collector.add(frame)
                if collector.full:
                    break
            waveform = collector.result()
    except (av.FFmpegError, OSError, StopIteration) as err:
        raise ClipError(f"cannot decode: {_short(err)}") from err
    if len(waveform) < min_seconds * sample_rate:
        raise ClipError(f"too short: audio {len(waveform) / sample_rate:.2f} s (minimum {min_seconds:g} s)")
    return DecodedClip(frames=sampler.result(), waveform=waveform, native_fps=frames_per_second,
                       num_source_frames=count, duration=min(count / frames_per_second, len(waveform) / sample_rate))


def _frame_count_guess(container: av.container.InputContainer, vstream: av.VideoStream, native_fps: float) -> int:
    """Frames the container says it has (mp4: exact), else the video duration × fps (mkv/webm: the DURATION tag);
    decode_clip checks the guess against the frames it decodes."""
    if vstream.frames > 0:
        return int(vstream.frames)
    if vstream.duration is not None and vstream.time_base is not None:
        return int(round(float(vstream.duration * vstream.time_base) * native_fps))
    tag = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", vstream.metadata.get("DURATION", ""))
    if tag:
        return int((int(tag[1]) * 3600 + int(tag[2]) * 60 + float(tag[3])) * native_fps + 1e-6)
    if container.duration is not None:  # of the longest stream: often the audio
        return int(container.duration / av.time_base * native_fps + 1e-6)
    return 0


def _decode_pass(container, vstream, astream, guess, limit, num_frames, frame_size, clip_seconds, sample_rate,
                 downmix, threads) -> tuple[np.ndarray | None, int, np.ndarray]:
    """One demux pass over both streams: the frames sampled for N = guess, the true N, the waveform."""
    vstream.thread_type = "AUTO"
    vstream.codec_context.thread_count = threads
    wanted = _wanted(guess, num_frames)
    sampler = _FrameSampler(frame_size, num_frames)
    max_samples = int(round(clip_seconds * sample_rate))
    audio = _AudioCollector(sample_rate, max_samples, downmix)
    count = 0
    try:
        for packet in container.demux(vstream, astream):
            if packet.stream.type == "video":
                if count >= limit:
                    continue
                for frame in packet.decode():
                    if count < limit:
                        sampler.take(frame, wanted.get(count, ()))
                    count += 1
            elif not audio.full:
                for frame in packet.decode():
                    audio.add(frame)
            if count >= limit and audio.full:
                break
    except av.FFmpegError as err:
        raise ClipError(f"cannot decode: {_short(err)}") from err
    count = min(count, limit)
    frames = sampler.result() if count == guess and count > 0 else None
    return frames, count, audio.result()


def _decode_frames(path, num_source_frames: int, num_frames: int, frame_size: int, threads: int) -> np.ndarray:
    """Second pass over the video only, with the true N (rare: only when the frame-count metadata is wrong)."""
    wanted = _wanted(num_source_frames, num_frames)
    try:
        with av.open(str(path)) as container:
            vstream = container.streams.video[0]
            vstream.thread_type = "AUTO"
            vstream.codec_context.thread_count = threads
            sampler = _FrameSampler(frame_size, num_frames)
            for k, frame in enumerate(container.decode(vstream)):
                if k >= num_source_frames:
                    break
                sampler.take(frame, wanted.get(k, ()))
    except av.FFmpegError as err:
        raise ClipError(f"cannot decode: {_short(err)}") from err
    return sampler.result()


def _wanted(num_source_frames: int, num_frames: int) -> dict[int, list[int]]:
    """source frame index -> the output positions i that sample it."""
    wanted: dict[int, list[int]] = {}
    for i, k in enumerate(sample_indices(num_source_frames, num_frames).tolist()):
        wanted.setdefault(k, []).append(i)
    return wanted


class _FrameSampler:
    """Resizes (short side S, bilinear) and centre-crops the sampled frames only."""

    def __init__(self, size: int, num_frames: int):
        self.size = size
        self.reformatter = VideoReformatter()
        self.out = np.zeros((num_frames, size, size, 3), np.uint8)  # (F, S, S, 3)
        self.filled = np.zeros(num_frames, bool)

    def take(self, frame: av.VideoFrame, positions) -> None:
        if not positions:
            return
        S = self.size
        rw, rh, left, top = resize_geometry(frame.width, frame.height, S)
        rgb = self.reformatter.reformat(frame, rw, rh, format="rgb24", interpolation="BILINEAR").to_ndarray()
        crop = rgb[top:top + S, left:left + S]  # (S, S, 3)
        for i in positions:
            self.out[i] = crop
            self.filled[i] = True

    def result(self) -> np.ndarray:
        if not self.filled.all():
            raise ClipError(f"cannot decode: {int((~self.filled).sum())} sampled frames missing")
        return self.out


class _AudioCollector:
    """Downmix + resample to mono `sample_rate` float32, keeping the first max_samples."""

    def __init__(self, sample_rate: int, max_samples: int, downmix: str):
        self.max_samples = max_samples
        self.downmix = downmix
        if downmix == "ffmpeg":
            self.resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        else:  # "mean": resample every channel in its own layout (planar), then average them in numpy
            self.resampler = av.AudioResampler(format="fltp", layout=None, rate=sample_rate)
        self.chunks: list[np.ndarray] = []
        self.samples = 0

    @property
    def full(self) -> bool:
        return self.samples >= self.max_samples

    def add(self, frame: av.AudioFrame | None) -> None:
        for out in self.resampler.resample(frame):
            x = out.to_ndarray()  # (1, n) packed mono, or (C, n) planar
            x = x.reshape(-1) if self.downmix == "ffmpeg" else x.mean(axis=0)
            self.chunks.append(x.astype(np.float32, copy=False))
            self.samples += len(x)

    def result(self) -> np.ndarray:
        if not self.full:
            self.add(None)  # flush the resampler's delay line
        if not self.chunks:
            return np.zeros(0, np.float32)
        return np.concatenate(self.chunks)[: self.max_samples]


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


# ----------------------------------------------------------------------------------------------------------
# encoding


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    waveform: np.ndarray | None,
    sample_rate: int,
    *,
    crf: int = 18,
) -> None:
    """Encode uint8 (N, H, W, 3) RGB frames (H, W even) as H.264 yuv420p and a float32 waveform (S,) or (C, S)
    in [-1, 1] as AAC, into an mp4. waveform=None writes a video-only file."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    N, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {W}x{H}")
    with av.open(str(path), mode="w", format="mp4") as container:
        vstream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        vstream.width, vstream.height, vstream.pix_fmt = W, H, "yuv420p"
        vstream.options = {"crf": str(crf), "preset": "veryfast"}
        astream = _add_audio_stream(container, waveform, sample_rate) if waveform is not None else None
        for i in range(N):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))
        if astream is not None:
            _encode_audio(container, astream, waveform, sample_rate)


def _add_audio_stream(container, waveform: np.ndarray, sample_rate: int):
    x = np.atleast_2d(np.asarray(waveform, dtype=np.float32))
    if x.shape[0] not in AUDIO_LAYOUTS:
        raise ValueError(f"waveform must be (S,) or (C, S) with C in {sorted(AUDIO_LAYOUTS)}, got {x.shape}")
    astream = container.add_stream("aac", rate=sample_rate)
    astream.layout = AUDIO_LAYOUTS[x.shape[0]]
    astream.format = "fltp"
    return astream


def _encode_audio(container, astream, waveform: np.ndarray, sample_rate: int) -> None:
    x = np.ascontiguousarray(np.atleast_2d(np.asarray(waveform, dtype=np.float32)))  # (C, S)
    step = astream.codec_context.frame_size or 1024
    for start in range(0, x.shape[1], step):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, start:start + step]), format="fltp",
                                           layout=astream.layout.name)
        frame.sample_rate, frame.pts = sample_rate, start
        container.mux(astream.encode(frame))
    container.mux(astream.encode(None))

