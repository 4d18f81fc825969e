"""Real-clip decoding with PyAV (media.py): frame sampling, resize/crop geometry, 16 kHz mono audio, errors."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from stella_cli import media
from stella_cli.media import ClipError, decode_clip, resize_geometry, sample_indices, write_mp4


def level_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frame i is a flat grey of level 10 + 10·i, so a decoded frame tells which source frame it was."""
    return np.stack([np.full((h, w, 3), 10 + 10 * i, np.uint8) for i in range(n)])  # (n, h, w, 3)


def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def source_index(frames: np.ndarray) -> np.ndarray:
    return np.round((frames[:, :, :, 0].mean(axis=(1, 2)) - 10) / 10).astype(int)


def test_sample_indices_and_geometry():
    assert sample_indices(250, 80)[:6].tolist() == [0, 3, 6, 9, 12, 15]  # 8 fps from 25 fps
    assert sample_indices(250, 80)[-1] == 246
    assert sample_indices(5, 8).tolist() == [0, 0, 1, 1, 2, 3, 3, 4]  # short clip: frames repeat
    assert resize_geometry(1280, 720, 256) == (455, 256, 100, 0)  # torchvision Resize(256) + CenterCrop(256)
    assert resize_geometry(720, 1280, 256) == (256, 455, 0, 100)
    assert resize_geometry(256, 256, 256) == (256, 256, 0, 0)


def test_decode_samples_frames_over_the_first_seconds(tmp_path):
    path = tmp_path / "levels.mp4"
    write_mp4(path, level_frames(20), 8, np.stack([tone(2.5, 44100)] * 2), 44100, crf=0)
    clip = decode_clip(path, num_frames=8, frame_size=16, clip_seconds=2.0)  # N = min(20, 2 s · 8 fps) = 16
    assert clip.frames.shape == (8, 16, 16, 3) and clip.frames.dtype == np.uint8
    assert clip.num_source_frames == 16
    assert source_index(clip.frames).tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    clip = decode_clip(path, num_frames=8, frame_size=16, clip_seconds=10.0)  # N = all 20 frames
    assert clip.num_source_frames == 20
    assert source_index(clip.frames).tolist() == (np.arange(8) * 20 // 8).tolist()  # [0, 2, 5, 7, 10, 12, 15, 17]
    assert clip.duration == pytest.approx(2.5, abs=0.01)


def test_short_clip_repeats_frames(tmp_path):
    path = tmp_path / "short.mp4"
    write_mp4(path, level_frames(6), 8, tone(0.75, 16000), 16000, crf=0)
    clip = decode_clip(path, num_frames=8, frame_size=16, clip_seconds=2.0, min_seconds=0.5)
    assert source_index(clip.frames).tolist() == [0, 0, 1, 2, 3, 3, 4, 5]


def test_wrong_frame_count_metadata_is_resampled(tmp_path, monkeypatch):
    path = tmp_path / "levels.mp4"
    write_mp4(path, level_frames(20), 8, tone(2.5, 16000), 16000, crf=0)
    monkeypatch.setattr(media, "_frame_count_guess", lambda *a: 23)  # a container that overstates its frames
    clip = decode_clip(path, num_frames=8, frame_size=16, clip_seconds=10.0)
    assert clip.num_source_frames == 20
    assert source_index(clip.frames).tolist() == (np.arange(8) * 20 // 8).tolist()


@pytest.mark.parametrize("width,height", [(64, 32), (32, 64)])
def test_resize_short_side_then_centre_crop(tmp_path, width, height):
    """A grey ramp along the long side: the crop must equal an antialiased bilinear resize + centre crop."""
    long = max(width, height)
    ramp = np.linspace(16, 235, long).astype(np.float32)
    img = np.broadcast_to(ramp[None, :] if width > height else ramp[:, None], (height, width))
    frame = np.repeat(np.round(img)[..., None], 3, axis=-1).astype(np.uint8)  # (H, W, 3)
    path = tmp_path / "ramp.mp4"
    write_mp4(path, np.stack([frame] * 16), 8, tone(2.0, 16000), 16000, crf=0)
    S = 16
    clip = decode_clip(path, num_frames=4, frame_size=S, clip_seconds=2.0)
    rw, rh, left, top = resize_geometry(width, height, S)
    assert (rw, rh) == ((32, 16) if width > height else (16, 32))
    ref = torch.nn.functional.interpolate(torch.from_numpy(frame).permute(2, 0, 1)[None].float(), size=(rh, rw),
                                          mode="bilinear", antialias=True, align_corners=False)[0]  # (3, rh, rw)
    ref = ref[:, top:top + S, left:left + S].permute(1, 2, 0).numpy()  # (S, S, 3)
    got = clip.frames[0].astype(np.float32)
    assert np.abs(got - ref).mean() < 3.0  # measured 1.6 (YUV round trip); a wrong crop or squash gives 28-54
    assert np.abs(got - ref).max() < 8.0
    # the crop is the middle: it spans about the middle half of the ramp, not its ends
    profile = got[..., 0].mean(axis=0 if width > height else 1)
    assert 60 < profile[0] < 80 and 170 < profile[-1] < 190


def test_audio_is_16k_mono_and_keeps_its_pitch(tmp_path):
    path = tmp_path / "tone.mp4"
    write_mp4(path, level_frames(24), 8, np.stack([tone(3.0, 44100, 440.0)] * 2), 44100)
    clip = decode_clip(path, num_frames=8, frame_size=16, clip_seconds=2.0)
    assert clip.waveform.shape == (32000,) and clip.waveform.dtype == np.float32  # the first 2 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(clip.waveform * np.hanning(len(clip.waveform))))
    assert np.fft.rfftfreq(len(clip.waveform), 1 / 16000)[spectrum.argmax()] == pytest.approx(440.0, abs=1.0)
    full = decode_clip(path, num_frames=8, frame_size=16, clip_seconds=10.0)
    assert abs(len(full.waveform) - 48000) <= 1024  # all 3 s (AAC pads up to one frame)


def test_downmix_ffmpeg_and_mean(tmp_path):
    """Stereo with the tone on the left only: ffmpeg -ac 1 keeps 0.707 of it, the channel mean 0.5."""
    path = tmp_path / "left.mp4"
    left = tone(2.0, 16000, 1000.0, amp=0.5)
    write_mp4(path, level_frames(16), 8, np.stack([left, np.zeros_like(left)]), 16000)
    peak = {m: np.abs(decode_clip(path, num_frames=4, frame_size=16, clip_seconds=2.0, downmix=m).waveform[
        4000:28000]).max() for m in ("ffmpeg", "mean")}
    assert peak["ffmpeg"] == pytest.approx(0.5 * 0.7071, rel=0.05)
    assert peak["mean"] == pytest.approx(0.5 * 0.5, rel=0.05)


def test_real_mp4_bigbuckbunny(bigbuckbunny):
    """1280x720 25 fps H.264 + 6-channel 48 kHz AAC, 5.3 s: fewer frames than 10 s, so all 132 are the source."""
    clip = decode_clip(bigbuckbunny)
    assert clip.frames.shape == (80, 256, 256, 3)
    assert clip.num_source_frames == 132 and clip.native_fps == 25.0
    assert clip.waveform.ndim == 1
    assert abs(len(clip.waveform) - 5.3 * 16000) < 0.05 * 16000
    assert clip.duration == pytest.approx(5.28, abs=0.01)
    assert clip.waveform.std() > 1e-3  # real sound, not silence
    assert np.abs(np.diff(clip.frames.astype(np.int16), axis=0)).mean() > 1  # the frames move


def test_unusable_clips_raise_with_a_reason(tmp_path, speech_dir):
    good = tmp_path / "good.mp4"
    write_mp4(good, level_frames(16), 8, tone(2.0, 16000), 16000)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    silent = tmp_path / "video_only.mp4"
    write_mp4(silent, level_frames(16), 8, None, 16000)
    short = tmp_path / "short.mp4"
    write_mp4(short, level_frames(2), 10, tone(0.2, 16000), 16000)
    wav = next(Path(speech_dir).glob("*.wav"))
    expected = {truncated: "cannot open", noise: "cannot open", silent: "no audio stream",
                short: "too short: video 0.20 s", wav: "no video stream", tmp_path / "absent.mp4": "cannot open"}
    for path, reason in expected.items():
        with pytest.raises(ClipError) as err:
            decode_clip(path, num_frames=8, frame_size=16, clip_seconds=2.0)
        assert err.value.reason.startswith(reason), (path.name, err.value.reason)


def test_write_mp4_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8), 8, None, 16000)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "f.mp4", np.zeros((2, 16, 16, 3), np.float32), 8, None, 16000)
    with pytest.raises(ValueError, match="C in"):
        write_mp4(tmp_path / "c.mp4", np.zeros((2, 16, 16, 3), np.uint8), 8, np.zeros((3, 100), np.float32), 16000)


def test_write_mp4_streams(tmp_path):
    path = tmp_path / "a.mp4"
    write_mp4(path, level_frames(12, 24, 32), 12, np.stack([tone(1.0, 22050)] * 2), 22050)
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, v.width, v.height, v.frames, float(v.average_rate)) == ("h264", 32, 24, 12, 12)
        assert (a.codec_context.name, a.sample_rate, a.layout.name) == ("aac", 22050, "stereo")


def write_webm(path: Path, frames: np.ndarray, fps: int, wave: np.ndarray) -> None:
    """VP9 (lossless) + Opus 48 kHz mono in WebM, as YouTube serves it."""
    with av.open(str(path), mode="w", format="webm") as c:
        v = c.add_stream("libvpx-vp9", rate=fps)
        v.width, v.height, v.pix_fmt, v.options = frames.shape[2], frames.shape[1], "yuv420p", {"lossless": "1"}
        a = c.add_stream("libopus", rate=48000)
        a.layout, a.format = "mono", "flt"
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            c.mux(v.encode(frame))
        c.mux(v.encode(None))
        step = 960
        for start in range(0, len(wave), step):
            frame = av.AudioFrame.from_ndarray(wave[None, start:start + step], format="flt", layout="mono")
            frame.sample_rate, frame.pts = 48000, start
            c.mux(a.encode(frame))
        c.mux(a.encode(None))


def test_webm_and_mkv(tmp_path, monkeypatch):
    """No frame count in the container: N comes from the DURATION tag and is checked while decoding."""
    second_passes = []
    real = media._decode_frames
    monkeypatch.setattr(media, "_decode_frames", lambda *a: (second_passes.append(a), real(*a))[1])
    webm = tmp_path / "clip.webm"
    write_webm(webm, level_frames(20), 8, tone(2.5, 48000, 440.0))
    clip = decode_clip(webm, num_frames=8, frame_size=16, clip_seconds=10.0)
    assert source_index(clip.frames).tolist() == (np.arange(8) * 20 // 8).tolist()
    assert abs(len(clip.waveform) - 40000) <= 320
    spectrum = np.abs(np.fft.rfft(clip.waveform * np.hanning(len(clip.waveform))))
    assert np.fft.rfftfreq(len(clip.waveform), 1 / 16000)[spectrum.argmax()] == pytest.approx(440.0, abs=1.0)
    mp4, mkv = tmp_path / "clip.mp4", tmp_path / "clip.mkv"
    write_mp4(mp4, level_frames(20), 8, tone(2.5, 16000), 16000)
    with av.open(str(mp4)) as src, av.open(str(mkv), mode="w") as dst:  # remux, same packets
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)
    a, b = (decode_clip(p, num_frames=8, frame_size=16, clip_seconds=10.0) for p in (mp4, mkv))
    assert np.array_equal(a.frames, b.frames)
    assert abs(len(a.waveform) - len(b.waveform)) <= 1024  # the remux loses AAC's priming-skip, not more
    assert second_passes == []
