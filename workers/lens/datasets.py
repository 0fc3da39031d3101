"""Parse uploaded prompt/target data sets (JSONL or TSV); torch-free so the API can import it.

JSONL: one JSON object per non-blank line, with a ``prompt`` (or ``text``) string and a
``target`` string; other keys are ignored.

TSV: tab-separated, either a header row naming a ``prompt`` (or ``text``) column and a
``target`` column, or exactly two columns (prompt, target) and no header. Cells may hold
``\\t``, ``\\n``, ``\\r`` and ``\\\\`` escapes, so multi-line prompts fit on one row.

Errors name the 1-based line, so a user can fix the file.
"""

from __future__ import annotations

import json
import re

from workers.lens.errors import InvalidParameter

FIELD = "dataset"
_FORMATS = {"jsonl": "jsonl", "ndjson": "jsonl", "tsv": "tsv", "tab": "tsv"}
_PROMPT_KEYS = ("prompt", "text")
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\(.)")


def parse_dataset(content: bytes, filename_or_format: str) -> list[dict[str, str]]:
    """Rows ``{"prompt", "target"}`` of a JSONL or TSV file, in file order."""
    fmt = dataset_format(filename_or_format)
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidParameter(FIELD, f"not UTF-8 text (byte {exc.start})") from None
    rows = _parse_jsonl(text) if fmt == "jsonl" else _parse_tsv(text)
    if not rows:
        raise InvalidParameter(FIELD, "holds no rows")
    return rows


def dataset_format(filename_or_format: str) -> str:
    """``jsonl`` or ``tsv`` from a file name's extension or a bare format name."""
    name = filename_or_format.strip().lower()
    fmt = _FORMATS.get(name.rsplit(".", 1)[-1])
    if fmt is None:
        raise InvalidParameter(
            "format", f"cannot tell the format of {filename_or_format!r}; use .jsonl or .tsv"
        )
    return fmt


def _row(line: int, prompt: object, target: object) -> dict[str, str]:
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise InvalidParameter(FIELD, f"line {line}: prompt and target must be strings")
    if not target:
        raise InvalidParameter(FIELD, f"line {line}: empty target")
    return {"prompt": prompt, "target": target}


def _parse_jsonl(text: str) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidParameter(FIELD, f"line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InvalidParameter(FIELD, f"line {number}: expected a JSON object")
        key = next((k for k in _PROMPT_KEYS if k in obj), None)
        if key is None or "target" not in obj:
            raise InvalidParameter(FIELD, f"line {number}: needs 'prompt' (or 'text') and 'target'")
        rows.append(_row(number, obj[key], obj["target"]))
    return rows


def _unescape(cell: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), cell)


def _parse_tsv(text: str) -> list[dict[str, str]]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        return []
    header = [c.strip().lower() for c in lines[0][1].split("\t")]
    prompt_col = next((header.index(k) for k in _PROMPT_KEYS if k in header), None)
    if prompt_col is not None and "target" in header:
        columns, body, width = (prompt_col, header.index("target")), lines[1:], len(header)
    else:
        columns, body, width = (0, 1), lines, 2
    rows = []
    for number, line in body:
        cells = line.split("\t")
        if len(cells) != width:
            raise InvalidParameter(
                FIELD, f"line {number}: expected {width} tab-separated columns, got {len(cells)}"
            )
        rows.append(_row(number, _unescape(cells[columns[0]]), _unescape(cells[columns[1]])))
    return rows
