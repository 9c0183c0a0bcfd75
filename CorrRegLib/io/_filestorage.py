"""A small reader for the YAML that OpenCV's ``cv::FileStorage`` writes (and ROS camera_info).

PyYAML is not a CorrReg requirement (it is not in Slicer's Python), and cv::FileStorage YAML is
not quite standard YAML anyway (``%YAML:1.0`` with a colon, ``!!opencv-matrix`` tags), so this
module parses the subset that calibration files use:

* ``%YAML...`` directives, ``---`` / ``...`` document markers and ``#`` comments are skipped;
* block mappings ``key: value`` nested by indentation;
* scalars: integers, floats (``.5``, ``1.e-3``, ``.Nan``, ``.Inf``), ``true``/``false``,
  ``null``/``~``, quoted or plain strings;
* flow sequences ``[a, b, ...]`` (nested, spanning several lines) and block sequences
  (``- item``, scalars or mappings);
* a mapping tagged ``!!opencv-matrix`` (``rows``, ``cols``, ``dt``, ``data``) becomes a
  (rows, cols) float64 numpy array.

Anything else (anchors, multi-line strings, flow mappings) raises ``ValueError``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class FileStorageError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _scalar(text: str) -> Any:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        return t[1:-1]
    low = t.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("null", "~", ""):
        return None
    if low in (".nan", "nan"):
        return math.nan
    if low in (".inf", "+.inf", "inf"):
        return math.inf
    if low in ("-.inf", "-inf"):
        return -math.inf
    if _NUMBER.match(t):
        if re.match(r"^[-+]?\d+$", t):
            return int(t)
        return float(t)
    return t


def _split_flow(text: str) -> list[str]:
    """Split the inside of a flow sequence at top-level commas."""
    parts, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _flow(text: str) -> Any:
    t = text.strip()
    if t.startswith("["):
        if not t.endswith("]"):
            raise FileStorageError(f"unterminated flow sequence: {t[:60]}")
        return [_flow(p) for p in _split_flow(t[1:-1])]
    if t.startswith("{"):
        raise FileStorageError("flow mappings ({...}) are not supported; write the mapping in block style")
    return _scalar(t)


def _logical_lines(text: str) -> list[tuple[int, str, int]]:
    """(indent, content, line number) per logical line; flow sequences are joined across lines."""
    out: list[tuple[int, str, int]] = []
    pending: list[str] = []
    pending_indent = pending_no = 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw.rstrip("\r\n")).rstrip()
        if pending:
            pending.append(line.strip())
            joined = " ".join(pending)
            if joined.count("[") <= joined.count("]"):
                out.append((pending_indent, joined, pending_no))
                pending = []
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("%") or stripped in ("---", "..."):
            continue
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise FileStorageError(f"line {no}: tabs are not allowed in YAML indentation")
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("---"):
            stripped = stripped[3:].strip()
            if not stripped:
                continue
        if stripped.count("[") > stripped.count("]"):
            pending, pending_indent, pending_no = [stripped], indent, no
            continue
        out.append((indent, stripped, no))
    if pending:
        raise FileStorageError(f"line {pending_no}: a flow sequence [...] is never closed")
    return out


def _split_key(content: str, no: int) -> tuple[str, str]:
    m = re.match(r"""^("[^"]*"|'[^']*'|[^:\s][^:]*?)\s*:(\s+|$)(.*)$""", content)
    if not m:
        raise FileStorageError(f"line {no}: expected 'key: value', got {content[:60]!r}")
    key = m.group(1)
    if key[0] in "\"'":
        key = key[1:-1]
    return key, m.group(3).strip()


def _opencv_matrix(node: Any, no: int) -> np.ndarray:
    if not isinstance(node, dict) or not {"rows", "cols", "data"} <= set(node):
        raise FileStorageError(f"line {no}: an !!opencv-matrix needs rows, cols and data")
    rows, cols, data = int(node["rows"]), int(node["cols"]), node["data"]
    arr = np.asarray(data if isinstance(data, list) else [data], dtype=np.float64).reshape(-1)
    if arr.size != rows * cols:
        raise FileStorageError(f"line {no}: an !!opencv-matrix of {rows} x {cols} has {arr.size} values in data")
    return arr.reshape(rows, cols)


def _parse_block(lines, i: int, indent: int) -> tuple[Any, int]:
    """Parse the block starting at lines[i] whose lines have exactly ``indent``."""
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        return _parse_sequence(lines, i, indent)
    out: dict = {}
    while i < len(lines) and lines[i][0] == indent:
        _, content, no = lines[i]
        if content.startswith("-"):
            raise FileStorageError(f"line {no}: a sequence item where a 'key: value' was expected")
        key, rest = _split_key(content, no)
        tag = None
        if rest.startswith("!"):
            tag, _, rest = rest.partition(" ")
            rest = rest.strip()
        i += 1
        if rest:
            value = _flow(rest)
        elif i < len(lines) and lines[i][0] > indent:
            value, i = _parse_block(lines, i, lines[i][0])
        elif i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
            value, i = _parse_sequence(lines, i, indent)  # "key:\n- a\n- b" (same indentation)
        else:
            value = None
        if tag in ("!!opencv-matrix", "!opencv-matrix"):
            value = _opencv_matrix(value, no)
        out[key] = value
    if i < len(lines) and lines[i][0] > indent:
        raise FileStorageError(f"line {lines[i][2]}: unexpected indentation")
    return out, i


def _parse_sequence(lines, i: int, indent: int) -> tuple[list, int]:
    out: list = []
    while i < len(lines) and lines[i][0] == indent and (lines[i][1].startswith("- ") or lines[i][1] == "-"):
        _, content, no = lines[i]
        item = content[1:].strip()
        i += 1
        if not item:
            if i < len(lines) and lines[i][0] > indent:
                value, i = _parse_block(lines, i, lines[i][0])
            else:
                value = None
        elif re.match(r"""^("[^"]*"|'[^']*'|[^:\s\[][^:]*?)\s*:(\s+|$)""", item):
            # "- key: value" opens a mapping whose further keys are indented past the dash
            sub = [(indent + 2, item, no)]
            while i < len(lines) and lines[i][0] > indent:
                sub.append(lines[i])
                i += 1
            value, j = _parse_block(sub, 0, indent + 2)
            if j != len(sub):
                raise FileStorageError(f"line {sub[j][2]}: unexpected indentation in a sequence item")
        else:
            value = _flow(item)
        out.append(value)
    return out, i


def parse_filestorage_yaml(text: str) -> dict:
    """Parse cv::FileStorage / ROS-style calibration YAML into nested dicts, lists, scalars and
    (for ``!!opencv-matrix``) numpy arrays. Raises ``ValueError`` on unsupported syntax."""
    lines = _logical_lines(text)
    if not lines:
        return {}
    value, i = _parse_block(lines, 0, lines[0][0])
    if i != len(lines):
        raise FileStorageError(f"line {lines[i][2]}: unexpected content {lines[i][1][:60]!r}")
    if not isinstance(value, dict):
        raise FileStorageError("the YAML document must be a mapping (key: value) at the top level")
    return value
