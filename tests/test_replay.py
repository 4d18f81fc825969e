"""Task-free reservoir buffer (method.md §3.9, §3.12; baselines.md §1.4; B22)."""

import io

import pytest
import torch

from helpers import bytes_per_clip, stella_fields, stella_plus_fields

from stella_cli.config import MODEL_PRESETS, num_core_tokens
from stella_cli.replay import ReservoirBuffer, merge_state_dicts, reservoir_slot, split_state_dict


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(start: int, n: int) -> dict[str, torch.Tensor]:
    """n clips whose fields all encode their stream id."""
    ids = torch.arange(start, start + n)
    return {"video": ids[:, None, None].float().expand(n, 2, 3).clone(), "z_a": ids[:, None].float() * 0.5,
            "order_v": ids[:, None].expand(n, 4).clone()}


def test_reservoir_slot_fills_then_keeps_with_probability_m_over_n():
    g = gen(0)
    state = g.get_state()
    assert [reservoir_slot(n, 10, g) for n in range(10)] == list(range(10))
    assert torch.equal(g.get_state(), state)  # no draw while filling
    hits = [reservoir_slot(39, 10, g) for _ in range(4000)]
    kept = [h for h in hits if h is not None]
    assert all(0 <= h < 10 for h in kept)
    assert abs(len(kept) - 1000) < 110  # P = 10/40, sd 27


def test_buffer_fills_slot_n_and_counts_every_row():
    buf = ReservoirBuffer(capacity=5)
    assert len(buf) == 0 and buf.is_empty()
    slots = buf.add(generator=gen(1), **rows(0, 3))
    assert slots.tolist() == [0, 1, 2] and buf.n_seen == 3 and len(buf) == 3
    slots = buf.add(generator=gen(1), **rows(3, 4))
    assert slots[:2].tolist() == [3, 4] and buf.n_seen == 7 and len(buf) == 5
    assert all(s == -1 or 0 <= s < 5 for s in slots[2:].tolist())
    assert buf.fields["video"].dtype == torch.float32 and buf.fields["order_v"].dtype == torch.long
    assert buf.fields["order_v"][:, 0].tolist() == [int(v) for v in buf.fields["z_a"][:, 0] * 2]
    with pytest.raises(ValueError, match="got fields"):
        buf.add(generator=gen(1), video=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="per-row shape"):
        buf.add(generator=gen(1), **{**rows(0, 1), "video": torch.zeros(1, 3, 3)})
    with pytest.raises(ValueError, match="different batch sizes"):
        buf.add(generator=gen(1), **{**rows(0, 2), "z_a": torch.zeros(3, 1)})


def test_every_clip_of_the_stream_is_kept_with_probability_m_over_n():
    M, N, reps = 5, 20, 1000
    g = gen(2)
    counts = torch.zeros(N)
    for _ in range(reps):
        buf = ReservoirBuffer(M)
        for start in range(0, N, 4):
            buf.add(generator=g, z_a=torch.arange(start, start + 4).float()[:, None])
        counts[buf.fields["z_a"][:, 0].long()] += 1
    expect = reps * M / N  # 250
    chi2 = ((counts - expect) ** 2 / expect).sum().item()
    assert chi2 < 43.8  # chi-square, 19 dof, p = 0.001
    assert counts.sum() == reps * M


def test_sample_is_uniform_without_replacement_and_clipped():
    buf = ReservoirBuffer(10)
    buf.add(generator=gen(3), **rows(0, 3))
    batch, idx = buf.sample(8, gen(4), return_indices=True)
    assert sorted(idx.tolist()) == [0, 1, 2] and batch["video"].shape == (3, 2, 3)  # clipped to len
    buf.add(generator=gen(3), **rows(3, 7))
    g, counts = gen(5), torch.zeros(10)
    for _ in range(3000):
        batch, idx = buf.sample(3, g, return_indices=True)
        assert len(set(idx.tolist())) == 3
        assert torch.equal(batch["z_a"][:, 0], buf.fields["z_a"][idx, 0])
        counts[idx] += 1
    chi2 = ((counts - 900) ** 2 / 900).sum().item()
    assert chi2 < 27.9  # 9 dof, p = 0.001
    with pytest.raises(ValueError, match="empty"):
        ReservoirBuffer(4).sample(2, gen(0))


def test_update_writes_back_sampled_rows():
    buf = ReservoirBuffer(4)
    buf.add(generator=gen(6), **rows(0, 4))
    _, idx = buf.sample(2, gen(7), return_indices=True)
    buf.update(idx, z_a=torch.full((2, 1), -1.0))
    assert (buf.fields["z_a"][idx] == -1).all() and (buf.fields["z_a"] == -1).sum() == 2


def test_state_dict_round_trips_through_torch_save_and_continues_identically():
    buf = ReservoirBuffer(6)
    g = gen(8)
    for start in range(0, 20, 5):
        buf.add(generator=g, **rows(start, 5))
    f = io.BytesIO()
    torch.save(buf.state_dict(), f)
    f.seek(0)
    other = ReservoirBuffer(1)
    other.load_state_dict(torch.load(f))  # weights_only: plain ints, strings and tensors
    assert other.n_seen == 20 and other.capacity == 6 and len(other) == 6
    for name in buf.fields:
        assert torch.equal(other.fields[name], buf.fields[name])
    g1, g2 = gen(9), gen(9)
    assert torch.equal(buf.add(generator=g1, **rows(20, 5)), other.add(generator=g2, **rows(20, 5)))
    assert all(torch.equal(buf.fields[k], other.fields[k]) for k in buf.fields)
    # a partly filled buffer keeps its free slots free
    part = ReservoirBuffer(6)
    part.add(generator=g, **rows(0, 2))
    again = ReservoirBuffer(6)
    again.load_state_dict(part.state_dict())
    assert len(again) == 2 and again.fields["video"].shape == (6, 2, 3)
    assert again.add(generator=g, **rows(2, 1)).tolist() == [2]
    with pytest.raises(ValueError, match="missing key 'n_seen'"):
        again.load_state_dict({"capacity": 6, "dtype": "float32", "fields": {}})


def test_merge_and_split_round_trip():
    g = gen(10)
    ranks = [ReservoirBuffer(4) for _ in range(2)]
    ranks[0].add(generator=g, **rows(0, 9))
    ranks[1].add(generator=g, **rows(100, 3))  # not full yet
    states = [b.state_dict() for b in ranks]
    merged = merge_state_dicts(states)
    assert merged["capacity"] == 8 and merged["n_seen"] == 12 and merged["fields"]["video"].shape[0] == 7
    back = split_state_dict(merged, 2)
    for s, t in zip(states, back):
        assert (s["capacity"], s["n_seen"]) == (t["capacity"], t["n_seen"])
        assert all(torch.equal(s["fields"][k], t["fields"][k]) for k in s["fields"])
    # through a checkpoint file too
    f = io.BytesIO()
    torch.save(merged, f)
    f.seek(0)
    reloaded = split_state_dict(torch.load(f), 2)
    assert all(torch.equal(a["fields"]["z_a"], b["fields"]["z_a"]) for a, b in zip(back, reloaded))
    # one rank: every stored clip in one buffer of the total capacity; rank 1 was not full, so the 7 rows cannot
    # fill min(12 seen, 8 slots): the rank counts 7 seen and keeps filling slot by slot (documented)
    (single,) = split_state_dict(merged, 1)
    assert (single["capacity"], single["n_seen"]) == (8, 7)
    assert torch.equal(single["fields"]["z_a"], merged["fields"]["z_a"])
    buf = ReservoirBuffer(1)
    buf.load_state_dict(single)
    assert len(buf) == 7 and buf.add(generator=g, **rows(200, 1)).tolist() == [7]


def test_split_to_another_world_size_deals_rows_in_rank_order():
    g = gen(11)
    ranks = [ReservoirBuffer(4) for _ in range(2)]
    ranks[0].add(generator=g, **rows(0, 10))
    ranks[1].add(generator=g, **rows(100, 10))
    merged = merge_state_dicts([b.state_dict() for b in ranks])
    four = split_state_dict(merged, 4)
    assert [(s["capacity"], s["n_seen"]) for s in four] == [(2, 5)] * 4
    assert torch.equal(torch.cat([s["fields"]["z_a"] for s in four]), merged["fields"]["z_a"])
    merged_again = merge_state_dicts(four)
    assert (merged_again["capacity"], merged_again["n_seen"]) == (8, 20)
    for s in four:
        b = ReservoirBuffer(1)
        b.load_state_dict(s)
        assert len(b) == 2


def test_stella_plus_halves_the_stored_bytes_at_the_paper_sizes():
    base = MODEL_PRESETS["base"]
    sizes = dict(num_frames=4, image_size=224, target_length=1024, num_mel_bins=128, patch_size=16,
                 embed_dim=base["embed_dim"], num_heads=base["num_heads"])
    full = stella_fields(**sizes)
    plus = stella_plus_fields(**sizes, K_V=num_core_tokens(784, 0.5), K_A=num_core_tokens(512, 0.5))
    # video 4·3·224·224·4 = 2,408,448 B; audio 1024·128·4 = 524,288; z 2·768·4; q̄ 2·12·64·4; p, I 2·(784+512)·4
    assert bytes_per_clip(full) == 2_408_448 + 524_288 + 6_144 + 6_144 + 10_368 == 2_955_392
    # core video 392·3·16·16·4 = 1,204,224; core audio 256·256·4 = 262,144; orderings (784+512)·8; z; q̄
    assert bytes_per_clip(plus) == 1_204_224 + 262_144 + 10_368 + 6_144 + 6_144 == 1_489_024
    assert 0.49 < bytes_per_clip(plus) / bytes_per_clip(full) < 0.51  # 0.504
    assert bytes_per_clip(full) * 500 / 1e9 == pytest.approx(1.48, abs=0.01)  # 500 slots per rank (method.md §1.4)


def test_nbytes_matches_the_field_spec_and_dtype_option():
    tiny = MODEL_PRESETS["tiny"]
    sizes = dict(num_frames=2, image_size=32, target_length=64, num_mel_bins=32, patch_size=16,
                 embed_dim=tiny["embed_dim"], num_heads=tiny["num_heads"])
    spec = stella_plus_fields(**sizes, K_V=4, K_A=4)
    batch = {name: torch.zeros(3, *shape, dtype=dtype) for name, (shape, dtype) in spec.items()}
    buf = ReservoirBuffer(7)
    buf.add(generator=gen(12), **batch)
    assert buf.nbytes() == 7 * bytes_per_clip(spec)
    half = ReservoirBuffer(7, dtype=torch.float16)
    half.add(generator=gen(12), **batch)
    assert half.fields["core_v"].dtype == torch.float16 and half.fields["order_v"].dtype == torch.long
    n_long = 7 * (8 + 8) * 8  # orderings: L_V = 2·4 = 8, L_A = 4·2 = 8 tokens
    assert half.nbytes() - n_long == (buf.nbytes() - n_long) // 2
    restored = ReservoirBuffer(1)
    restored.load_state_dict(half.state_dict())
    assert restored.dtype == torch.float16 and restored.nbytes() == half.nbytes()
