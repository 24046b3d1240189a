"""Export collected dialogs for other tools: `baize-export-dialogs DIALOGS --format F --out OUT`.

Formats (one JSON object a line):
  baize    {"id", "topic", "input"}: the Baize training text ("The conversation between human and AI assistant."
           then `[|Human|]` / `[|AI|]` turns, closed by a `[|Human|]` marker), as in the Baize data release.
  chatml   {"id", "messages": [{"role": "system"|"user"|"assistant", "content"}]}: OpenAI fine-tuning / ChatML
           messages (a system message only when --system is given).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from baize_exp.data import dialog_shape_error, to_baize_text, to_chat_messages
from baize_exp.errors import ExportError, exit_on_error
from baize_exp.io import iter_jsonl, write_jsonl

FORMATS = ("baize", "chatml")


def _checked(path: Path) -> Iterator[tuple[int, dict]]:
    for i, (line, d) in enumerate(iter_jsonl(path), start=1):
        err = dialog_shape_error(d) or ("no turns" if not d["turns"] else None)
        if err:
            raise ExportError(
                f"{path}:{line}: {err}; a dialog is {{'turns': [{{'role': 'human'|'ai', 'text': str}}, ...]}}"
            )
        yield i, d


def export_records(dialogs_path: str | Path, fmt: str, system: str | None = None) -> list[dict]:
    """The dialogs of a dialogs.jsonl in an export format (see the module doc)."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    path = Path(dialogs_path)
    if not path.is_file():
        raise ExportError(f"{path}: no such dialogs file")
    out = []
    for i, d in _checked(path):
        did = d.get("id", f"dialog-{i:06d}")
        if fmt == "baize":
            out.append({"id": did, "topic": d.get("seed", ""), "input": to_baize_text(d["turns"])})
        else:
            msgs = to_chat_messages(d["turns"])
            out.append({"id": did, "messages": ([{"role": "system", "content": system}] if system else []) + msgs})
    return out


def export(dialogs_path: str | Path, out_path: str | Path, fmt: str, system: str | None = None) -> int:
    """Write the export (atomically); return the number of dialogs written."""
    records = export_records(dialogs_path, fmt, system)
    write_jsonl(out_path, records)
    return len(records)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="baize-export-dialogs",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("dialogs", help="a collect/dialogs.jsonl")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="the .jsonl to write")
    ap.add_argument("--system", default=None, help="chatml: a system message put first in every dialog")
    a = ap.parse_args(argv)
    with exit_on_error("baize_exp.data.export"):
        n = export(a.dialogs, a.out, a.format, a.system)
    print(f"wrote {n} dialogs to {a.out} ({a.format})")


if __name__ == "__main__":
    main()
