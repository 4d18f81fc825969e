"""Task-free reservoir replay buffer (method.md §3.9, §3.12; baselines.md §1.4; `utils/buffer.py`).

One buffer per rank, capacity M = memory_size // world_size (the caller passes it), never reset between tasks.
Fields are arbitrary named tensors allocated on the CPU on the first `add`: floating fields in the buffer dtype
(float32 as the authors), integer/bool fields (orderings) in their own dtype. STELLA stores full clips and the
scoring of the iteration that added them; STELLA+ only the core patches and their orderings; the baselines store
subsets (each method's `memory_fields`).

Checkpoints (method.md §9.3 B22): the authors save each rank's buffer, concatenate them into the checkpoint and split
them back evenly on resume. `merge_state_dicts` / `split_state_dict` do the same on our state dicts, so a
checkpoint holds one world-size independent buffer: resuming with the same world size restores every rank
exactly; with another world size the stored clips are dealt out in rank order (see `split_state_dict`).
"""

from __future__ import annotations


import torch
from torch import Tensor



def reservoir_slot(n_seen: int, capacity: int, generator: torch.Generator) -> int | None:
    """Classic reservoir sampling (method.md §3.9, `buffer.py:10-24`).

    The (n_seen+1)-th item goes to slot n_seen while n_seen < M; afterwards r ~ U{0..n_seen} and it replaces
    slot r if r < M, else it is dropped (None). Every item of a stream of n is then kept with probability M/n.
    """
    if n_seen < capacity:
        return n_seen
    r = int(torch.randint(0, n_seen + 1, (1,), generator=generator))
    return r if r < capacity else None


class ReservoirBuffer:
    """Per-rank reservoir over the whole stream; see the module docstring."""

    def __init__(self, capacity: int, dtype: torch.dtype = torch.float32) -> None:
        if capacity < 0:
            raise ValueError(f"ReservoirBuffer: capacity must be >= 0, got {capacity}")
        self.capacity = capacity  # M, slots on this rank
        self.dtype = dtype  # storage dtype of floating fields
        self.n_seen = 0  # rows offered so far on this rank, over all tasks and epochs
        self.fields: dict[str, Tensor] = {}  # name -> (M, ...) CPU storage, allocated on the first add

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def is_empty(self) -> bool:
        return len(self) == 0

    def _storage_dtype(self, x: Tensor) -> torch.dtype:
        return self.dtype if x.is_floating_point() else x.dtype

    def _check_fields(self, fields: dict[str, Tensor], where: str) -> int:
        if not fields:
            raise ValueError(f"ReservoirBuffer.{where}: no fields given")
        sizes = {name: x.shape[0] for name, x in fields.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ReservoirBuffer.{where}: fields have different batch sizes {sizes}")
        for name, x in fields.items():
            if self.fields:
                if name not in self.fields:
                    raise ValueError(f"ReservoirBuffer.{where}: unknown field {name!r}; "
                                     f"the buffer stores {sorted(self.fields)}")
                if x.shape[1:] != self.fields[name].shape[1:]:
                    raise ValueError(f"ReservoirBuffer.{where}: field {name!r} has per-row shape "
                                     f"{tuple(x.shape[1:])}, the buffer {tuple(self.fields[name].shape[1:])}")
        return next(iter(sizes.values()))

    def add(self, *, generator: torch.Generator, **fields: Tensor) -> Tensor:
        """Offer every row to the reservoir (`buffer.py:51-97`), in row order. fields: name -> (B, ...).

        Rows are detached and copied to the CPU; generator: a CPU generator (the reservoir draws r ~ U{0..n}).
        The first call fixes the field set; later calls must give the same fields.
        Returns the slot of each row, (B,) long, −1 where the row was not kept.
        """
        B = self._check_fields(fields, "add")
        if not self.fields:
            self.fields = {name: torch.zeros((self.capacity, *x.shape[1:]), dtype=self._storage_dtype(x))
                           for name, x in fields.items()}
        elif set(fields) != set(self.fields):
            raise ValueError(f"ReservoirBuffer.add: got fields {sorted(fields)}, the buffer stores "
                             f"{sorted(self.fields)}")
        slots = []
        for _ in range(B):
            slot = reservoir_slot(self.n_seen, self.capacity, generator)
            self.n_seen += 1
            slots.append(-1 if slot is None else slot)
        slots_t = torch.tensor(slots, dtype=torch.long)  # (B,)
        # a later row that lands on the same slot overwrites an earlier one, as in the authors' row loop
        last_row = {slot: row for row, slot in enumerate(slots) if slot >= 0}
        if last_row:
            rows = torch.tensor(list(last_row.values()), dtype=torch.long)
            self.update(torch.tensor(list(last_row.keys()), dtype=torch.long),
                        **{name: x[rows.to(x.device)] for name, x in fields.items()})
        return slots_t

    def sample(self, n: int, generator: torch.Generator,
               return_indices: bool = False) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
        """min(n, len) rows drawn uniformly without replacement from the filled slots (`buffer.py:99-125`).

        generator: a CPU generator (the buffer lives on the CPU). Returns name -> (n', ...) copies, plus the
        slot indices (n',) long when return_indices (GMED writes back through `update`).
        """
        idx = self.permutation(generator)[:n]  # (n',) long
        batch = self.rows(idx)
        return (batch, idx) if return_indices else batch

    def permutation(self, generator: torch.Generator) -> Tensor:
        """The filled slots in uniformly random order, (len,) long; its first n are `sample(n)`'s draw."""
        if self.is_empty():
            raise ValueError("ReservoirBuffer.sample: the buffer is empty")
        return torch.randperm(len(self), generator=generator)

    def rows(self, indices: Tensor) -> dict[str, Tensor]:
        """Copies of the rows at slots `indices` (n,): name -> (n, ...)."""
        return {name: x[indices] for name, x in self.fields.items()}

    def update(self, indices: Tensor, **fields: Tensor) -> None:
        """Overwrite rows `indices` (n,) of the given fields with (n, ...) tensors."""
        if not self.fields:
            raise ValueError("ReservoirBuffer.update: the buffer has no fields yet (call add first)")
        self._check_fields(fields, "update")
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        for name, x in fields.items():
            store = self.fields[name]
            store[indices] = x.detach().to(device="cpu", dtype=store.dtype)

    def nbytes(self) -> int:
        """Bytes of the allocated storage (all M slots)."""
        return sum(x.numel() * x.element_size() for x in self.fields.values())

    def state_dict(self, copy: bool = True) -> dict:
        """Plain dict (ints, strings, tensors) for torch.save; only the filled rows are saved (copy=False: views of
        them, for summarize_buffer without copying the memory)."""
        return {"capacity": self.capacity, "n_seen": self.n_seen, "dtype": str(self.dtype).removeprefix("torch."),
                "fields": {name: x[:len(self)].clone() if copy else x[:len(self)] for name, x in self.fields.items()}}

    def load_state_dict(self, state: dict) -> None:
        for key in ("capacity", "n_seen", "dtype", "fields"):
            if key not in state:
                raise ValueError(f"ReservoirBuffer.load_state_dict: missing key {key!r} in the buffer state")
        self.capacity, self.n_seen = int(state["capacity"]), int(state["n_seen"])
        self.dtype = getattr(torch, state["dtype"])
        filled = len(self)
        self.fields = {}
        for name, rows in state["fields"].items():
            if rows.shape[0] != filled:
                raise ValueError(f"ReservoirBuffer.load_state_dict: field {name!r} has {rows.shape[0]} rows, "
                                 f"expected min(n_seen, capacity) = {filled}")
            store = torch.zeros((self.capacity, *rows.shape[1:]), dtype=rows.dtype)
            store[:filled] = rows
            self.fields[name] = store


def merge_state_dicts(states: list[dict]) -> dict:
    """One checkpoint buffer from the per-rank states, in rank order (method.md §9.3 B22: concatenate).

    capacity and n_seen are summed, filled rows concatenated; `ranks` keeps each rank's (capacity, n_seen) so
    that `split_state_dict` with the same world size restores every rank exactly.
    """
    if not states:
        raise ValueError("merge_state_dicts: no buffer states given")
    filled = [s for s in states if s["fields"]]
    names = set(filled[0]["fields"]) if filled else set()
    for rank, s in enumerate(states):
        if s["fields"] and set(s["fields"]) != names:
            raise ValueError(f"merge_state_dicts: rank {rank} stores {sorted(s['fields'])}, "
                             f"another rank {sorted(names)}")
    return {
        "capacity": sum(s["capacity"] for s in states),
        "n_seen": sum(s["n_seen"] for s in states),
        "dtype": states[0]["dtype"],
        "fields": {name: torch.cat([s["fields"][name] for s in filled]) for name in names} if filled else {},
        "ranks": [{"capacity": s["capacity"], "n_seen": s["n_seen"]} for s in states],
    }


def split_state_dict(state: dict, world_size: int) -> list[dict]:
    """Per-rank buffer states from a merged one (method.md §9.3 B22: split evenly by rank).

    Same world size as when merged: exact per-rank states. Another world size: rank r gets capacity
    M_total // W and n_seen = n_total // W (+1 for r < n_total % W), and the stored rows are dealt out in order,
    min(n_seen_r, M_r) to each; a rank left with fewer rows than that (uneven ranks before) gets n_seen = its
    row count, so it keeps filling slot by slot. Rows beyond the new total capacity are dropped.
    """
    if world_size < 1:
        raise ValueError(f"split_state_dict: world_size must be >= 1, got {world_size}")
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == world_size:
        plan = [(r["capacity"], r["n_seen"]) for r in ranks]
    else:
        cap, n = state["capacity"] // world_size, state["n_seen"]
        plan = [(cap, n // world_size + (r < n % world_size)) for r in range(world_size)]
    fields = state["fields"]
    available = next(iter(fields.values())).shape[0] if fields else 0
    out, start = [], 0
    for cap, n_seen in plan:
        take = min(n_seen, cap, available - start)
        if take < min(n_seen, cap):
            n_seen = take
        out.append({"capacity": cap, "n_seen": n_seen, "dtype": state["dtype"],
                    "fields": {name: x[start:start + take].clone() for name, x in fields.items()}})
        start += take
    return out


# ----------------------------------------------------------------------------------------------------------
# inspection (`stella buffer`)


def summarize_buffer(state: dict, task_names: list[str] | None = None) -> dict:
    """What a saved buffer holds: fill, stored fields and bytes, clips per task, mean pruning probabilities.

    state: `ReservoirBuffer.state_dict()` or a merged one (`merge_state_dicts`).  Task counts need the `task`
    field (stored by STELLA / STELLA+ for inspection only).
    """
    fields = state["fields"]
    filled = next(iter(fields.values())).shape[0] if fields else 0
    summary = {
        "capacity": state["capacity"], "n_seen": state["n_seen"], "filled": filled,
        "ranks": state.get("ranks", [{"capacity": state["capacity"], "n_seen": state["n_seen"]}]),
        "fields": {name: {"shape": list(x.shape[1:]), "dtype": str(x.dtype).removeprefix("torch."),
                          "bytes_per_clip": x[0].numel() * x.element_size() if filled else 0}
                   for name, x in fields.items()},
    }
    summary["bytes_per_clip"] = sum(f["bytes_per_clip"] for f in summary["fields"].values())
    summary["bytes"] = summary["bytes_per_clip"] * filled
    if "task" in fields and filled:
        counts = torch.bincount(fields["task"].long(), minlength=len(task_names or []))
        names = task_names or [str(i) for i in range(len(counts))]
        summary["clips_per_task"] = {names[i]: int(c) for i, c in enumerate(counts.tolist())}
    for name in ("p_v", "p_a"):  # mean pruning probability over the candidate (non-zero) patches
        if name in fields and filled:
            p = fields[name].float()
            summary[f"mean_{name}"] = float(p[p > 0].mean()) if (p > 0).any() else 0.0
    return summary
