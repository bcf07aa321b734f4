"""Prompt files in the formats the papers publish, read into prompt records.

A record is a dict with at least ``"prompt"``; the formats, told apart by content:

- **GenEval metadata** (JSONL, every line): ``{"tag", "include", "exclude"?, "prompt"}``, as
  GenEval's ``evaluation_metadata.jsonl`` and Flow-GRPO's ``train/test_metadata.jsonl``;
  records get ``"task": "geneval"``;
- **prompt records** (JSONL): any JSON object with a non-empty ``"prompt"`` string;
- **OCR prompts** (``.txt``): one prompt a line, the target text between the first pair of
  double quotes (Flow-GRPO's ``ocr/train.txt``, ``test.txt``); records get ``"target"`` and
  ``"task": "ocr"``;
- **plain prompts** (``.txt``): one prompt a line (PickScore, DrawBench).

Detection (``detect_format``): a file whose first non-empty line starts with ``{`` is JSONL
(GenEval metadata, validated line by line, when every object has ``tag`` and ``include``); a
``.jsonl``/``.json`` file must be JSONL. A text file is OCR prompts when at least half of its lines hold a quoted
target, else plain prompts: plain prompt sets quote rarely (DrawBench: 0 of 1,000 lines), OCR
sets on every line, so a few lines without a target in an OCR file are errors, not a switch of
format. Pass ``format=`` to skip detection. Every malformed line is a one-line ``UserError``
naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flowopd.data.text import read_text_lines
from flowopd.errors import UserError, unknown

FORMATS = ("geneval", "jsonl", "ocr", "plain")
JSON_SUFFIXES = (".jsonl", ".json")


def detect_format(path: str | os.PathLike, lines: list[str]) -> str:
    """The format of a prompt file from its lines (see the module docstring)."""
    from flowopd.rewards.ocr import extract_target

    body = [ln.strip() for ln in lines if ln.strip()]
    if not body:
        raise UserError(f"prompt file {path} holds no prompts; give one prompt a line")
    if body[0].startswith("{"):
        recs = _parse_json_lines(Path(path), lines)
        is_geneval = all("include" in r and "tag" in r for _, r in recs)
        return "geneval" if is_geneval else "jsonl"
    if Path(path).suffix.lower() in JSON_SUFFIXES:
        raise UserError(
            f"{path}:{_lineno(lines, 0)}: not valid JSON: a {Path(path).suffix} file needs one "
            "JSON object a line; rename it to .txt if it holds one prompt a line"
        )
    quoted = sum(extract_target(ln) is not None for ln in body)
    return "ocr" if 2 * quoted >= len(body) else "plain"


def _lineno(lines: list[str], k: int) -> int:
    """1-based line number of the k-th non-empty line."""
    seen = -1
    for i, ln in enumerate(lines, 1):
        if ln.strip():
            seen += 1
            if seen == k:
                return i
    return len(lines)


def _parse_json_lines(path: Path, lines: list[str]) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line; a line that is not a JSON object is a
    ``UserError`` naming it."""
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{i}: not valid JSON ({e.msg}); fix or remove the line"
            ) from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{i}: expected a JSON object with a 'prompt' string")
        out.append((i, rec))
    return out


def _json_records(path: Path, lines: list[str], geneval: bool) -> list[dict]:
    """Prompt records of a JSONL file; ``geneval``: every line is GenEval metadata (validated,
    ``task`` defaults to geneval). Otherwise any object with a ``prompt`` string (a mixed file
    of GenEval and OCR records, as the toy world writes, is of this kind)."""
    from flowopd.rewards.geneval import _check_metadata

    out = []
    for i, rec in _parse_json_lines(path, lines):
        if geneval:
            rec = _check_metadata(rec, f"{path}:{i}")
            rec.setdefault("task", "geneval")
        elif not isinstance(rec.get("prompt"), str):
            raise UserError(f"{path}:{i}: expected a JSON object with a 'prompt' string")
        if not rec["prompt"].strip():
            raise UserError(f"{path}:{i}: empty 'prompt'; give the line a prompt or remove it")
        out.append(rec)
    return out


def _text_records(path: Path, lines: list[str], ocr: bool) -> list[dict]:
    from flowopd.rewards.ocr import extract_target, normalize

    out = []
    for i, line in enumerate(lines, 1):
        prompt = line.strip()
        if not prompt:
            continue
        if not ocr:
            out.append({"prompt": prompt})
            continue
        target = extract_target(prompt)
        if target is None or not normalize(target):
            raise UserError(
                f"{path}:{i}: OCR prompt without a quoted target text ({prompt[:60]!r}); put "
                'the text to render between double quotes, e.g. a sign that says "OPEN"'
            )
        out.append({"prompt": prompt, "target": target, "task": "ocr"})
    return out


def read_prompt_file(path: str | os.PathLike, format: str = "auto") -> list[dict]:
    """Prompt records of a file in any published format (``format="auto"`` detects it).

    Returns one dict per non-empty line, in file order (repeated lines kept: Flow-GRPO's test
    files repeat each prompt once per image). Raises ``UserError`` for a missing, binary,
    non-UTF-8 or empty file and for any malformed line.
    """
    if format != "auto" and format not in FORMATS:
        raise unknown("prompt file format", format, ("auto", *FORMATS))
    p = Path(path).expanduser()
    lines = read_text_lines(p, "prompt file")
    fmt = detect_format(p, lines) if format == "auto" else format
    if fmt in ("geneval", "jsonl"):
        out = _json_records(p, lines, geneval=fmt == "geneval")
    else:
        out = _text_records(p, lines, ocr=fmt == "ocr")
    if not out:
        raise UserError(f"prompt file {p} holds no prompts; give one prompt a line")
    return out


def unique_records(records: list[dict]) -> list[dict]:
    """Records with exact repeats removed, first occurrences in order.

    Flow-GRPO's test files repeat a prompt once per image (GenEval 553 x 4 lines, DrawBench
    200 x 5); the evaluation protocol samples ``images_per_prompt`` images of each unique one.
    """
    seen: set[str] = set()
    out = []
    for rec in records:
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out
