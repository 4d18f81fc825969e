"""What stella prints, and which process prints it: the one rich console, rank-0 lines, tables of rows.

Library code never prints directly: it calls `log` (rank 0 only, one line each whatever the terminal width) or
`print_rows`. Metrics go to files (metrics.jsonl, results/*.json), not to the console. torchrun sets RANK in every
process it starts (and `stella train` only forms a process group under torchrun), so the rank that prints and
writes files is known from the environment, before any process group exists and without importing torch (the
CLI imports this module at start-up).
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

console = Console()


def is_main() -> bool:
    """True in the process that prints, logs and writes files: outside torchrun, and on its rank 0."""
    return os.environ.get("RANK", "0") == "0"


def rank_prefix() -> str:
    """'[rank N] ' on the non-zero ranks of a torchrun job, so their lines can be told apart; '' otherwise."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1" else f"[rank {rank}] "


def log(message: str) -> None:
    """One line on rank 0 (rich markup allowed), never wrapped."""
    if is_main():
        console.print(message, soft_wrap=True)


def print_rows(title: str, rows: list[list[str]], *, left: int = 1) -> None:
    """A table whose rows[0] is the header; the first `left` columns are aligned left, the others (numbers) right.
    Cells may hold rich markup (e.g. the best value of a column in green)."""
    table = Table(title=title)
    for i, name in enumerate(rows[0]):
        table.add_column(name, justify="left" if i < left else "right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
