"""Reading user text files with one-line errors (missing, a directory, binary, not UTF-8), and
writing JSONL atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from flowopd.errors import UserError

_SNIFF = 8192  # bytes looked at for NUL bytes (the mark of a binary file)


def read_text_lines(path: str | os.PathLike, what: str = "prompt file") -> list[str]:
    """The lines of a UTF-8 text file (a leading BOM is dropped; line ends removed).

    what: how the error messages name the file ("prompt file", "GenEval metadata file").
    Raises ``UserError`` naming the file (and the line, for a bad byte) and the fix.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} not found: {p}; fix the path")
    if p.is_dir():
        raise UserError(f"{what} {p} is a directory; pass the file itself")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(
            f"cannot read {what} {p}: {e.strerror or e}; check its permissions"
        ) from None
    if b"\x00" in raw[:_SNIFF]:
        raise UserError(
            f"{what} {p} is not UTF-8 text (it is a binary file); pass a UTF-8 text file "
            "(.jsonl or .txt, one prompt a line)"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{what} {p} is not UTF-8 text (byte {raw[e.start]:#04x} on line {line}); "
            "re-save it as UTF-8"
        ) from None
    return text.splitlines()


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """One JSON object a line, written atomically: a temp file in the same folder, then a
    rename, so an interrupted write leaves the old file (or none), never half a file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(
            f"output {path} is a directory; pass a file name such as {path}/train.jsonl"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(
            f"cannot write {path}: {e.strerror or e}; choose a writable folder"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
