"""Helpers shared by several test modules: made-up media and lists, key layouts, tiny recipes and streams.

Plain functions and constants (fixtures live in conftest.py); test modules import them from here and never from
each other.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from stella_cli.cache import DONE, CacheSpec, SplitWriter, spec_to_dict, write_manifest, write_meta
from stella_cli.config import AVMConfig, MethodConfig, ModelConfig, load_recipe, resolve_model_preset, token_counts
from stella_cli.data import IMAGENET_MEAN, IMAGENET_STD
from stella_cli.media import write_mp4
from stella_cli.model import CAVMAE
from stella_cli.synth import SynthConfig, prepare_synthetic


# ----------------------------------------------------------------------------------------------------------
# prep: the fixture files under tests/data/prep and made-up media

FIX = Path(__file__).parent / "data" / "prep"
VGG_STAT, VGG_LABELS = FIX / "vggsound_stat.csv", FIX / "vggsound_labels.csv"


AS_LISTS, AS_LABELS = FIX / "audioset_class_lists.py", FIX / "audioset_labels.csv"
TINY = CacheSpec(num_frames=8, frame_size=16, fps=4.0, clip_seconds=2.0, target_length=192, num_mel_bins=64)


VGG_MIDS = [line.split(",")[1] for line in VGG_LABELS.read_text().splitlines()[1:]]  # 18 classes, label order


def make_clip(path: Path, seconds: float = 2.0, fps: int = 8, seed: int = 0, audio: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (int(seconds * fps), 24, 32, 3), dtype=np.uint8)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)).astype(np.float32) if audio else None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, frames, fps, wave, 16000)
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """A real png through PyAV's png encoder: uint8 (H, W) grey or (H, W, 3) RGB."""
    import av

    ctx = av.CodecContext.create("png", "w")
    fmt = "gray" if pixels.ndim == 2 else "rgb24"
    ctx.width, ctx.height, ctx.pix_fmt = pixels.shape[1], pixels.shape[0], fmt
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None)))
    return path


def write_wav(path: Path, seconds: float, seed: int = 0, sample_rate: int = 16000) -> Path:
    """A 16-bit mono wav of a tone (the wave module)."""
    import wave

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pcm = (0.3 * np.sin(2 * np.pi * (300 + 40 * seed) * t) * 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


CLI_BATCH = """
import json, sys
from stella_cli.cli import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["stella", *argv]
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    print()
    print(f"@@exit {code}@@", flush=True)
"""


def cli_batch(*runs: list[str]) -> list[tuple[int, str]]:
    """[(exit code, output)] of `stella ARGS...` for each run, all through stella_cli.cli.main in ONE subprocess
    (the import of torch, most of a run's time, is paid once). Output is stdout and stderr together."""
    result = subprocess.run([sys.executable, "-c", CLI_BATCH, json.dumps([[str(a) for a in r] for r in runs])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    parts = result.stdout.split("@@exit ")
    assert len(parts) == len(runs) + 1, result.stdout[-3000:]
    out, done = parts[0], []
    for part in parts[1:]:
        code, _, rest = part.partition("@@")
        done.append((int(code), out))
        out = rest
    return done


def write_json(path: Path, items: list[tuple[str, str]]) -> Path:
    path.write_text(json.dumps({"data": [{"video_id": v, "wav": f"/x/{v}.flac", "video_path": "/x/frames/",
                                          "labels": lab} for v, lab in items]}))
    return path


def fake_vggsound(tmp_path: Path, n_train: int = 5, n_test: int = 6, n_retrieval: int | None = 5) -> dict:
    """CAV-MAE style jsons over all 18 fixture classes, with an empty media file per clip (planning only)."""
    media_dir = tmp_path / "media"
    media_dir.mkdir(parents=True)
    lists = {}
    for split, n in (("train", n_train), ("test", n_test), ("retrieval", n_retrieval)):
        if n is None:
            continue
        items = [(f"c{j:02d}{split[:2]}{k}_{k:06d}", mid) for j, mid in enumerate(VGG_MIDS) for k in range(n)]
        for vid, _ in items:
            (media_dir / f"{vid}.mp4").touch()
        lists[split] = write_json(tmp_path / f"{split}.json", items)
    return {"list_file": lists, "root": media_dir, "categories": VGG_STAT, "labels": VGG_LABELS}


# ----------------------------------------------------------------------------------------------------------
# the authors' key layout and an ImageNet MAE state dict, written out from the descriptions

def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def authors_keys(D, Dd, modality_depth, fusion_depth, decoder_depth, mlp_ratio, L_V, L_A, p) -> dict:
    """Key -> shape of the authors' CAV built with loss_names [mae_audio, mae_frame, contrastive]."""
    keys = {}

    def block(prefix, dim, modality_norms=False):
        h = int(dim * mlp_ratio)
        norms = ["norm1", "norm2"] + (["norm1_a", "norm1_v", "norm2_a", "norm2_v"] if modality_norms else [])
        for n in norms:
            keys[f"{prefix}.{n}.weight"] = keys[f"{prefix}.{n}.bias"] = (dim,)
        keys.update({f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
                     f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
                     f"{prefix}.mlp.fc1.weight": (h, dim), f"{prefix}.mlp.fc1.bias": (h,),
                     f"{prefix}.mlp.fc2.weight": (dim, h), f"{prefix}.mlp.fc2.bias": (dim,)})

    keys.update({"patch_embed_v.proj.weight": (D, 3, p, p), "patch_embed_v.proj.bias": (D,),
                 "patch_embed_a.proj.weight": (D, 1, p, p), "patch_embed_a.proj.bias": (D,),
                 "pos_embed_v": (1, L_V, D), "inter_pos_embed_v": (1, L_V, D), "modality_v": (1, 1, D),
                 "pos_embed_a": (1, L_A, D), "inter_pos_embed_a": (1, L_A, D), "modality_a": (1, 1, D),
                 "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
                 "mask_token_v": (1, 1, Dd), "mask_token_a": (1, 1, Dd),
                 "decoder_pos_embed_v": (1, L_V, Dd), "decoder_pos_embed_a": (1, L_A, Dd),
                 "decoder_modality_v": (1, 1, Dd), "decoder_modality_a": (1, 1, Dd),
                 "mae_score_audio.decoder.weight": (p * p, Dd), "mae_score_audio.decoder.bias": (p * p,),
                 "mae_score_video.decoder.weight": (3 * p * p, Dd), "mae_score_video.decoder.bias": (3 * p * p,)})
    for n in ("norm", "norm_a", "norm_v", "decoder_norm"):
        keys[f"{n}.weight"] = keys[f"{n}.bias"] = (Dd,) if n == "decoder_norm" else (D,)
    for i in range(modality_depth):
        block(f"blocks_a.{i}", D)
        block(f"blocks_v.{i}", D)
    for i in range(fusion_depth):
        block(f"blocks_u.{i}", D, modality_norms=True)
    for i in range(decoder_depth):
        block(f"decoder_blocks.{i}", Dd)
    return keys


def random_state(keys: dict, prefix: str, seed: int) -> dict:
    g = gen(seed)
    return {prefix + k: torch.randn(*s, generator=g) for k, s in keys.items()}


def fake_mae_state_dict(embed_dim=64, depth=2, decoder_embed_dim=32, decoder_depth=1, mlp_ratio=2.0, patch=16,
                        image_size=64, seed=0) -> dict:
    """An ImageNet MAE (facebookresearch/mae models_mae.py) state dict at a given size, random values."""
    D, Dd, g = embed_dim, decoder_embed_dim, image_size // patch
    keys = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + g * g, D), "patch_embed.proj.weight": (D, 3, patch, patch),
            "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,), "mask_token": (1, 1, Dd),
            "decoder_pos_embed": (1, 1 + g * g, Dd), "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
            "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
            "decoder_pred.weight": (patch * patch * 3, Dd), "decoder_pred.bias": (patch * patch * 3,)}
    for prefix, n, dim in (("blocks", depth, D), ("decoder_blocks", decoder_depth, Dd)):
        block = authors_keys(dim, dim, 1, 0, 0, mlp_ratio, 1, 1, patch)
        for i in range(n):
            keys.update({f"{prefix}.{i}.{k.split('.', 2)[2]}": s for k, s in block.items() if k.startswith("blocks_a.0.")})
    return random_state(keys, "", seed)


# ----------------------------------------------------------------------------------------------------------
# tiny training runs on the tiny synthetic stream

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["task1", "task2"]


# the synthetic recipes start from the initialisation chain's checkpoints (data/synthetic/init); the tests' tiny runs
# start from random weights instead
RANDOM_START = ["model.checkpoint=", "model.checkpoint_made_by=", "model.avm.checkpoint="]  # a recipe without a start


def tiny_overrides(tmp_path: Path, data_root: Path, name: str) -> list[str]:
    """Any synthetic recipe at the tiny preset, from random weights: 2 tasks x 1 epoch x 4 steps."""
    return [f"data.root={data_root}", "data.num_workers=0", "model.preset=tiny", "method.memory_size=12",
            "train.epochs=1", "train.batch_size=4", "train.log_every=1", f"output.dir={tmp_path / name}",
            *RANDOM_START]


def tiny_recipe(tmp_path: Path, data_root: Path, name: str = "run", *overrides: str, recipe: str = "synthetic.yaml"):
    """recipes/synthetic.yaml (or another recipe) at the tiny preset: 2 tasks x 1 epoch x 4 steps."""
    return load_recipe(ROOT / "recipes" / recipe, tiny_overrides(tmp_path, data_root, name) + list(overrides))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"method.{k}": v for k, v in state["method"].items()}}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def retrieval_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results" / "retrieval.json").read_text())["rows"]


# ----------------------------------------------------------------------------------------------------------
# one method at the paper's input sizes on a tiny model

PAPER_SIZES = dict(num_frames=4, image_size=224, target_length=1024, num_mel_bins=128)  # L_V 784, L_A 512


def make_method(cls, B=2, memory=8, sizes=PAPER_SIZES, **method_overrides):
    """The paper's input sizes (so the paper's token counts) on a narrow, shallow model."""
    torch.manual_seed(0)
    cfg = resolve_model_preset(ModelConfig(preset="tiny"))
    backbone = CAVMAE(cfg, **sizes)
    return cls(backbone, MethodConfig(name="stella", **method_overrides), avm_cfg=AVMConfig(), batch_size=B,
               memory_per_rank=memory, seed=0, rank=0, device=torch.device("cpu"))


def batch(B=2, seed=0, sizes=PAPER_SIZES):
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(B, sizes["num_frames"], 3, sizes["image_size"], sizes["image_size"], generator=g),
            "audio": torch.randn(B, 1, sizes["target_length"], sizes["num_mel_bins"], generator=g),
            "label": torch.arange(B), "task": torch.zeros(B, dtype=torch.long), "index": torch.arange(B) + seed * B}


def record_sequences(module: torch.nn.Module) -> list[tuple[str, int, bool]]:
    """(block name, tokens, output requires grad) for every transformer block call."""
    calls = []
    for name, sub in module.named_modules():
        if name.startswith(("backbone.blocks_", "backbone.decoder_blocks.")) and name.count(".") == 2:
            sub.register_forward_hook(lambda m, inp, out, name=name: calls.append(
                (name.split(".")[1], out.shape[1], out.requires_grad)))
    return calls


# ----------------------------------------------------------------------------------------------------------
# the tiny synthetic stream and what one memory slot holds

def tiny_synthetic(out: Path, test_per_class: int = 1) -> Path:
    """The suite's small stream: 4 classes in 2 tasks, 8 train clips per class (4 steps per task at batch 4, 8 over
    the union), 3 retrieval clips per class (a gallery of 12)."""
    prepare_synthetic(out, seed=0, fmt="cache", workers=1, frames_format="raw", progress=False,
                      config=SynthConfig(num_classes=4, num_tasks=2, train_per_class=8, test_per_class=test_per_class,
                                         retrieval_per_class=3))
    return out


def stella_fields(*, num_frames: int, image_size: int, target_length: int, num_mel_bins: int, patch_size: int,
                  embed_dim: int, num_heads: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-clip shapes and dtypes STELLA stores: the full augmented clip, DER targets, q̄, p and I (method.md §3.9)."""
    L_V, L_A = token_counts(num_frames, image_size, target_length, num_mel_bins, patch_size)
    d_h = embed_dim // num_heads
    f32 = torch.float32
    return {
        "video": ((num_frames, 3, image_size, image_size), f32), "audio": ((1, target_length, num_mel_bins), f32),
        "z_a": ((embed_dim,), f32), "z_v": ((embed_dim,), f32),
        "q_bar_v": ((num_heads, d_h), f32), "q_bar_a": ((num_heads, d_h), f32),
        "p_v": ((L_V,), f32), "p_a": ((L_A,), f32), "I_v": ((L_V,), f32), "I_a": ((L_A,), f32),
    }


def stella_plus_fields(*, num_frames: int, image_size: int, target_length: int, num_mel_bins: int,
                       patch_size: int, embed_dim: int, num_heads: int, K_V: int,
                       K_A: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-clip shapes and dtypes STELLA+ stores: core patches, orderings, DER targets, q̄ (method.md §3.12)."""
    L_V, L_A = token_counts(num_frames, image_size, target_length, num_mel_bins, patch_size)
    d_h, p = embed_dim // num_heads, patch_size
    f32 = torch.float32
    return {
        "core_v": ((K_V, 3, p, p), f32), "core_a": ((K_A, 1, p, p), f32),
        "order_v": ((L_V,), torch.long), "order_a": ((L_A,), torch.long),
        "z_a": ((embed_dim,), f32), "z_v": ((embed_dim,), f32),
        "q_bar_v": ((num_heads, d_h), f32), "q_bar_a": ((num_heads, d_h), f32),
    }


def bytes_per_clip(fields: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Stored bytes of one slot for a field spec (no allocation)."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in fields.values())


# ----------------------------------------------------------------------------------------------------------
# prepared data whose numbers say where they came from (downstream inputs)


def write_cache(root: Path, spec: CacheSpec, clips: dict[str, list[dict]], *, dataset: str = "synthetic",
                num_classes: int = 1, masks: dict[str, np.ndarray] | None = None) -> Path:
    """A prepared-data folder (cache.py layout) from made-up clips, one task "t1". clips[split] is a list of
    {label, event (start, end) or None, frames (F, S, S, 3) uint8, fbank (T, M), boxes (F, 4)}; frames and fbank
    default to `indexed_frames` / `indexed_fbank`. masks[split] is written as cache/{split}/masks.npy."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_meta(root, {"dataset": dataset, "tasks": ["t1"], "splits": list(clips), "spec": spec_to_dict(spec),
                      "classes": [{"index": i, "name": f"c{i}", "category": f"c{i}", "task": "t1"}
                                  for i in range(num_classes)]})
    for split, items in clips.items():
        writer = SplitWriter(root, split, len(items), spec, with_boxes=any("boxes" in c for c in items))
        rows = []
        for row, clip in enumerate(items):
            writer.write(row, clip.get("frames", indexed_frames(spec)), clip.get("fbank", indexed_fbank(spec)),
                         clip.get("boxes"))
            writer.mark(row, DONE)
            event = clip.get("event")
            rows.append({"clip_id": f"{split}{row}", "row": row, "label": clip.get("label", 0),
                         "labels": str(clip.get("label", 0)), "category": "c", "task": "t1",
                         "duration": spec.clip_seconds, "source": "made up",
                         "event_start": "" if event is None else event[0],
                         "event_end": "" if event is None else event[1]})
        writer.flush()
        write_manifest(root, split, rows)
        if masks and split in masks:
            np.save(root / "cache" / split / "masks.npy", masks[split])
    return root


def indexed_frames(spec: CacheSpec) -> np.ndarray:
    """uint8 (F, S, S, 3): cached frame i is filled with the value i."""
    return np.broadcast_to(np.arange(spec.num_frames, dtype=np.uint8)[:, None, None, None],
                           (spec.num_frames, spec.frame_size, spec.frame_size, 3)).copy()


def indexed_fbank(spec: CacheSpec) -> np.ndarray:
    """(T, M): fbank row t holds t + 1 (so the zero padding of a segment stays recognisable)."""
    return np.broadcast_to(np.arange(1, spec.target_length + 1, dtype=np.float32)[:, None],
                           (spec.target_length, spec.num_mel_bins)).copy()


def frame_ids(video: torch.Tensor) -> list:
    """The cached frame index each frame of a model input (..., 3, S, S) was read from (indexed_frames)."""
    first = video[..., 0, 0, 0].double() * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # channel 0, top-left pixel
    return torch.round(first * 255).long().tolist()


def fbank_rows(audio: torch.Tensor, mean: float = -5.081, std: float = 4.4849) -> list[int]:
    """The cached fbank row (+ 1) each row of a normalised (1, T, M) input came from; 0 = padding."""
    return torch.round(audio.reshape(-1, audio.shape[-1])[:, 0].double() * std + mean).long().tolist()


def assert_png(path: Path, min_side: int = 250, max_side: int = 3000) -> tuple[int, int]:
    """A PNG file (signature) whose IHDR width and height are of a readable figure."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert min_side <= width <= max_side and min_side <= height <= max_side, (path, width, height)
    return width, height


# several commands through the CLI's entry point (cli.main, as `python -m stella_cli` runs it) in one child process
MANY = """
import json, sys
from stella_cli.cli import main
for args in json.loads(sys.argv[1]):
    sys.argv = ["stella", *args]
    print("<<<", flush=True)
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    print(f">>> {code}", flush=True)
"""


def cli_many(*commands: list[str], cwd: Path = ROOT) -> list[tuple[int, str]]:
    """(exit code, output) of each `stella ARGS...` command, one after the other in one child process (one start-up,
    for commands that fail before doing any work)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "400"}  # rich: no wrapping
    proc = subprocess.run([sys.executable, "-c", MANY, json.dumps(commands)], capture_output=True, text=True,
                          env=env, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    parts = proc.stdout.split("<<<\n")[1:]
    assert len(parts) == len(commands), proc.stdout + proc.stderr
    return [(int(p.rsplit(">>> ", 1)[1]), p.rsplit(">>> ", 1)[0]) for p in parts]
