"""Small file helpers shared by the stages: JSON lines that survive a crash, keyed caches, content hashes, locks."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from baize_exp.errors import UserError


class JsonlError(UserError, ValueError):
    """A JSONL file with a corrupt line that is not a crash-truncated tail."""


def decode_utf8(path: str | Path, data: bytes, first_line: int = 1) -> str:
    """`data` (the bytes of `path` from line `first_line` on) as text; a JsonlError naming the line and column of
    the first byte that is not UTF-8 otherwise (Python's own error names neither the file nor the line)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + first_line
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise JsonlError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); save the file as UTF-8"
        ) from None


def iter_jsonl(path: str | Path, repair_tail: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file, read a line at a time (a
    collection's dialogs file can be larger than memory); see `read_jsonl`."""
    for line, _, value in jsonl_entries(path, repair_tail):
        yield line, value


def jsonl_entries(
    path: str | Path, repair_tail: bool = False, skip_torn_tail: bool = False
) -> Iterator[tuple[int, int, Any]]:
    """`iter_jsonl` with where each line starts: (line number, byte offset, parsed value), so a reader can come
    back to a record later (seek there, read one line) instead of holding it. `skip_torn_tail`: a reader that must
    not write ignores a crash's torn last line instead of cutting it off."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        offset = 0  # where the current line starts: a torn tail is cut off there
        for i, raw in enumerate(f):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except UnicodeDecodeError:
                decode_utf8(path, raw, first_line=i + 1)  # raises, naming the line
                raise
            except json.JSONDecodeError as e:
                is_tail = not raw.endswith(b"\n")  # no newline after it: the write never finished
                if is_tail and (repair_tail or skip_torn_tail):
                    if repair_tail:
                        with open(path, "r+b") as w:
                            w.truncate(start)
                    return
                torn = " (the file ends mid-line: a write that never finished?)" if is_tail else ""
                raise JsonlError(f"{path}:{i + 1}: not valid JSON ({e.msg}){torn}; fix or remove that line") from None
            yield i + 1, start, value


def iter_records(path: str | Path, repair_tail: bool = False, skip_torn_tail: bool = False) -> Iterator[dict]:
    """The objects of a JSON-lines file, one at a time (see `read_jsonl`, which lists them)."""
    for line, _, value in jsonl_entries(path, repair_tail, skip_torn_tail):
        if not isinstance(value, dict):
            raise JsonlError(
                f"{path}:{line}: expected a JSON object, found {type(value).__name__}; one record per line"
            )
        yield value


def read_jsonl(path: str | Path, repair_tail: bool = False) -> list[dict]:
    """Read a JSON-lines file of objects.

    A last line without a trailing newline that does not parse is what a crash mid-write leaves: with
    `repair_tail` it is cut off the file (and returned nowhere); otherwise, and for a corrupt line anywhere
    else, a line that is not an object, or bytes that are not UTF-8, JsonlError names the file and line.
    """
    return list(iter_records(path, repair_tail))


class JsonlWriter:
    """Append records one per line, flushed and fsynced, so a crash loses at most the line being written.

    Every record reaches the OS at once (a killed process loses nothing written); `sync_every_s` > 0 groups the
    fsyncs (at most one per interval, and one at close), because an fsync per record (~6 ms here) is what would
    cap a writer of 60 records/s; only a power loss could then cost the last interval.
    """

    def __init__(self, path: str | Path, sync_every_s: float = 0.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self.sync_every_s, self._synced = sync_every_s, 0.0

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        now = time.monotonic()
        if now - self._synced >= self.sync_every_s:
            os.fsync(self._f.fileno())
            self._synced = now

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class KeyedJsonl:
    """A disk cache: records in one JSON-lines file, found by their "key"; each `put_many` appends and fsyncs,
    so a crash keeps what was made (a torn last line is cut off when the file is next opened)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries = {r["key"]: r for r in read_jsonl(self.path, repair_tail=True)}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put_many(self, items: list[tuple[str, dict]]) -> None:
        if not items:
            return
        with JsonlWriter(self.path) as w:
            for key, rec in items:
                rec = {"key": key, **rec}
                w.write(rec)
                self.entries[key] = rec


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write a whole file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def strict_json(obj: Any) -> Any:
    """`obj` with NaN and infinities as None: JSON has no such numbers, and other tools' parsers refuse them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write strict JSON atomically (temp file + rename); NaN and infinities become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(strict_json(obj), indent=2, ensure_ascii=False, default=str, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def content_hash(*parts: Any, n: int = 16) -> str:
    """A stable short hash of JSON-serialisable parts (dict key order does not matter)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:n]


def file_hash(path: str | Path, n: int = 16) -> str:
    """Hash of a file's bytes, or of every file under a dir (names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:n]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes: the jobs of a sweep start at once and must not convert a model
    or collect the same dialogs twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def global_rank() -> int:
    """This process's rank in a multi-process launch (Lightning's DDP re-launch, torchrun, srun); 0 otherwise.
    Rank 0 alone writes a run's shared files; the other ranks read them."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if int(os.environ.get(var, 0) or 0) != 0:
            return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 1)) or 1)
    return 0
