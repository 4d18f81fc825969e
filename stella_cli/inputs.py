"""`stella prep`'s inputs as the datasets release them: text files, SPLIT=FILE lists, media under --root, and the
duplicates and train/test leaks of the lists.

Text: UTF-8 with or without a byte-order mark (Windows editors and Excel write one), CRLF or LF line ends; a file
saved as UTF-16 or in another encoding is refused with one line. Delimited files: `,`, `;` or a tab, decided from
the header line (public copies of the MSR-VTT csvs use `;`). Media: every file under --root with a media
extension, found by file stem; symbolic links to folders are followed (datasets on shared storage are usually
linked in), each real folder once.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stella_cli.errors import StellaError

MEDIA_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv"}
DELIMITERS = (",", ";", "\t")
EXAMPLES = 5  # examples named in a message or a report entry


def read_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped); StellaError naming the file if it is missing,
    a folder, or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise StellaError(f"{path}: {what} not found")
    if path.is_dir():
        raise StellaError(f"{path}: is a folder; expected the {what} file")
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise StellaError(f"{path}: {what} is saved as UTF-16; save it as UTF-8 (e.g. Excel: CSV UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise StellaError(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[err.start]:02x}); save it as "
                          f"UTF-8") from None


def sniff_delimiter(header: str) -> str:
    """The delimiter of a delimited file, from its first line: the most frequent of `,` `;` tab (`,` if none)."""
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def read_rows(path: Path, what: str, delimiter: str | None = None) -> tuple[list[list[str]], str]:
    """(rows, delimiter) of a delimited text file (csv module: quoted fields may hold the delimiter); the delimiter
    is sniffed from the first line unless given. Row k of the list is line k + 1 of the file as long as no quoted
    field spans lines."""
    text = read_text(path, what)
    delimiter = delimiter or sniff_delimiter(text.split("\n", 1)[0])
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)), delimiter


def parse_split_files(text: str, splits: Iterable[str], form: str) -> dict[str, Path]:
    """`--list SPLIT=FILE[,SPLIT=FILE...]` -> {split: Path}; `form` is the usage shown when a part is malformed."""
    splits, found = list(splits), {}
    for part in str(text).split(","):
        split, sep, file = part.partition("=")
        split = split.strip()
        if not sep or not file.strip():
            raise StellaError(f"--list {part}: give {form}")
        if split not in splits:
            raise StellaError(f"--list {part}: unknown split {split!r}; give {form}")
        if split in found:
            raise StellaError(f"--list: {split}= is given twice")
        found[split] = Path(file.strip())
    return found


def examples(items: Iterable[Any], n: int = EXAMPLES) -> str:
    """'a, b, c (and 4 more)' for messages."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------------------
# media under --root


def walk_files(root: Path) -> Iterable[Path]:
    """Every file under root, sorted per folder; linked folders are followed, each real folder once."""
    seen: set[str] = set()
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for f in sorted(files):
            yield Path(dirpath) / f


class MediaIndex:
    """Media files under --root by file stem, and by YouTube id for audiosetdl's {ytid}_{start}_{end} names."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.by_stem: dict[str, Path] = {}
        self.by_ytid: dict[str, Path | None] = {}
        for p in walk_files(self.root):
            if p.suffix.lower() not in MEDIA_EXTENSIONS:
                continue
            self.by_stem.setdefault(p.stem, p)
            m = re.fullmatch(r"(.+?)_(\d+)_(\d+)", p.stem)
            if m:  # a YouTube id with two clips is ambiguous: None
                self.by_ytid[m.group(1)] = None if m.group(1) in self.by_ytid else p

    def __len__(self) -> int:
        return len(self.by_stem)

    def find(self, names: list[str], ytid: str | None = None, path: str | None = None) -> Path | None:
        """The file of an explicit path, else of the first name that is a file stem, else of the YouTube id."""
        if path:
            for p in (Path(path), self.root / path):
                if p.is_file():
                    return p
        for name in names:
            if name in self.by_stem:
                return self.by_stem[name]
        return self.by_ytid.get(ytid) if ytid else None

    def require_some(self, listed: int, found: int, looked_for: list[str]) -> None:
        """Refuse a list none of whose clips has a file under --root, saying what was looked for and found."""
        if found or not listed:
            return
        if not len(self):
            raise StellaError(f"--root {self.root}: no media files ({', '.join(sorted(MEDIA_EXTENSIONS))}) under it "
                              f"(linked folders are followed); give the folder that holds the videos")
        raise StellaError(f"--root {self.root}: none of the {listed} listed clips has a media file there (looked "
                          f"for file names like {examples(looked_for, 3)}; found e.g. "
                          f"{examples(sorted(p.name for p in self.by_stem.values()), 3)})")


# ----------------------------------------------------------------------------------------------------------
# duplicates and leaks


def repeated(ids: Iterable[tuple[str, str]]) -> list[str]:
    """'id (where, again at where2)' for every id listed more than once, in list order."""
    first: dict[str, str] = {}
    again: dict[str, list[str]] = {}
    for clip_id, where in ids:
        if clip_id in first:
            again.setdefault(clip_id, []).append(where)
        else:
            first[clip_id] = where
    return [f"{k} ({first[k]}, again at {', '.join(v)})" for k, v in again.items()]


def duplicate_note(split: str, ids: Iterable[tuple[str, str]]) -> str | None:
    """A report line for the ids listed more than once in one split (the first is kept), or None."""
    dup = repeated(ids)
    if not dup:
        return None
    return f"{split}: {len(dup)} clip ids listed more than once (the first is kept): {examples(dup)}"


def check_leaks(clips: dict[str, list[tuple[str, str]]], allow: bool, pairs: Iterable[tuple[str, str]]
                ) -> dict[str, Any]:
    """Clips in both splits of a pair (by media file or id). Refused unless `allow`; returns the report entries
    {'train/test': {'count', 'examples'}}. clips: split -> [(key, 'clip_id (where)')]."""
    leaks: dict[str, Any] = {}
    for a, b in pairs:
        keys = {k for k, _ in clips.get(b, [])}
        hits = [label for k, label in clips.get(a, []) if k in keys]
        if hits:
            leaks[f"{a}/{b}"] = {"count": len(hits), "examples": hits[:EXAMPLES]}
    if leaks and not allow:
        pair, entry = next(iter(leaks.items()))
        a, b = pair.split("/")
        raise StellaError(f"{entry['count']} clips are in both the {a} and the {b} split (e.g. "
                          f"{', '.join(entry['examples'][:3])}): a {b} clip must not be trained on; fix the lists, "
                          f"or pass --allow-leaks to keep them in both (they are counted in prep_report.json)")
    return leaks


def leak_note(leaks: dict[str, Any]) -> list[str]:
    """Report lines for the leaks kept with --allow-leaks."""
    return [f"{v['count']} clips are in both {k.replace('/', ' and ')} (--allow-leaks), e.g. "
            f"{', '.join(v['examples'])}" for k, v in leaks.items()]


__all__ = ["read_text", "read_rows", "sniff_delimiter", "parse_split_files", "examples", "walk_files", "MediaIndex",
           "repeated", "duplicate_note", "check_leaks", "leak_note", "MEDIA_EXTENSIONS"]
