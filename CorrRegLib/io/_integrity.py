"""Is an image file complete? Checks SimpleITK does not make.

SimpleITK reads a truncated NIfTI (plain or gzipped) without an error, filling the missing
voxels with zeros, and reads a truncated JPEG with only a warning on stderr; a header that
declares far more voxels than the file holds fails with "Failed to allocate memory". Before the
pixels are read, :func:`check_image_data` compares the voxel data the header declares with what
the file holds: the byte count of raw data (NIfTI, NRRD, MetaImage, Analyze), the whole
compressed stream for gzip / zlib / bzip2 data (decompressed piece by piece, so its CRC and length
are verified without holding it in memory), the end-of-image marker of a JPEG, and finally the
memory the voxels need against the machine's.
"""

from __future__ import annotations

import bz2
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

_CHUNK = 1 << 20
_MAX_OUT = 1 << 24
# zlib's deflate cannot compress better than about 1032:1.
_MAX_DEFLATE_RATIO = 1100

_COMPONENT_BYTES = {}
for _names, _n in (
    (("UInt8", "Int8", "LabelUInt8"), 1),
    (("UInt16", "Int16", "LabelUInt16"), 2),
    (("UInt32", "Int32", "Float32", "LabelUInt32"), 4),
    (("UInt64", "Int64", "Float64", "LabelUInt64", "ComplexFloat32"), 8),
    (("ComplexFloat64",), 16),
):
    for _name in _names:
        for _prefix in ("sitk", "sitkVector"):
            _id = getattr(sitk, _prefix + _name, None)
            if isinstance(_id, int) and _id >= 0:
                _COMPONENT_BYTES[_id] = _n


class _Incomplete(Exception):
    """The stream ended early or is corrupt (message: why)."""


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n:.3g} PB"


def _decompressor(kind: str):
    if kind == "bzip2":
        return bz2.BZ2Decompressor()
    return zlib.decompressobj(16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS)


def _stream_size(f, offset: int, kind: str, head: int = 0) -> tuple[int, bytes]:
    """(decompressed size, its first ``head`` bytes) of the gzip/zlib/bzip2 data from ``offset``
    to the end of the file, decompressed piece by piece; raises _Incomplete if the stream is
    truncated or corrupt (gzip and zlib verify their checksum and length at the end)."""
    f.seek(offset)
    d = _decompressor(kind)
    total, first, data = 0, b"", b""
    while True:
        if not data and (kind != "bzip2" or d.eof or d.needs_input):
            data = f.read(_CHUNK)
            if not data:
                break
        if d.eof:
            if kind == "gzip" and data[:2] == b"\x1f\x8b":  # another gzip member
                d = _decompressor(kind)
                continue
            break  # bytes after the stream are ignored, as gzip does
        try:
            out = d.decompress(data, _MAX_OUT)
        except (zlib.error, OSError, EOFError) as err:
            raise _Incomplete(f"is corrupt ({err})") from None
        first += out[: max(0, head - len(first))]
        total += len(out)
        data = d.unused_data if d.eof else (b"" if kind == "bzip2" else d.unconsumed_tail)
    if not d.eof and kind != "bzip2":
        try:
            total += len(d.flush())
        except zlib.error as err:
            raise _Incomplete(f"is corrupt ({err})") from None
    if not d.eof:
        raise _Incomplete("is cut short (the compressed stream ends early)")
    return total, first


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _nifti_vox_offset(head: bytes) -> int | None:
    """vox_offset of a NIfTI-1/2 (or Analyze) header, None if ``head`` is not one."""
    if len(head) < 4:
        return None
    for endian in "<>":
        (size,) = struct.unpack(endian + "i", head[:4])
        if size == 348 and len(head) >= 112:
            return int(struct.unpack(endian + "f", head[108:112])[0])
        if size == 540 and len(head) >= 176:
            return int(struct.unpack(endian + "q", head[168:176])[0])
    return None


def _text_header(f, terminator) -> tuple[list[str], int]:
    """Lines of an ASCII header and the byte offset just after it; ``terminator(line)`` says
    whether a line is the header's last."""
    f.seek(0)
    lines, pos = [], 0
    while True:
        raw = f.readline(65536)
        if not raw:
            return lines, pos
        pos += len(raw)
        line = raw.decode("latin-1").rstrip("\r\n")
        lines.append(line)
        if terminator(line):
            return lines, pos


def _available(path: Path, data: Path | None, offset: int, encoding: str, skip: int, head: int = 0):
    """(bytes of voxel data the file holds, first decompressed bytes) for raw or compressed data."""
    target = data if data is not None else path
    if data is not None:
        offset = 0
    with open(target, "rb") as f:
        if encoding == "raw":
            return max(0, os.path.getsize(target) - offset - skip), b""
        size, first = _stream_size(f, offset, encoding, head)
        return max(0, size - skip), first


def _layout(path: Path) -> tuple[Path | None, int, str, int] | None:
    """(data file or None for attached data, data offset, encoding raw/gzip/zlib/bzip2, bytes
    to skip before the voxels) for the formats checked, None for the others."""
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic.startswith(b"NRRD000"):
            lines, end = _text_header(f, lambda ln: ln.strip() == "")
            fields = {}
            for ln in lines[1:]:
                key, sep, value = ln.partition(":")
                if sep and not ln.startswith("#"):
                    fields[key.strip().lower()] = value.lstrip("=").strip()
            enc = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(
                fields.get("encoding", "raw").lower())
            if enc is None or "line skip" in fields or fields.get("byte skip", "0") == "-1":
                return None  # ascii / hex data, or skips we do not model: leave it to ITK
            skip = int(fields.get("byte skip", "0") or 0) if enc == "raw" else 0
            name = fields.get("data file") or fields.get("datafile")
            if name:
                if name.upper().startswith("LIST") or "%" in name or " " in name:
                    return None
                return path.parent / name, 0, enc, skip
            return None, end, enc, skip
        if magic[:2] == b"\xff\xd8":
            return None  # JPEG: checked by its end marker
    suf = path.name.lower()
    if suf.endswith((".mha", ".mhd")):
        with open(path, "rb") as f:
            lines, end = _text_header(f, lambda ln: ln.split("=")[0].strip().lower() == "elementdatafile")
        fields = {ln.split("=", 1)[0].strip().lower(): ln.split("=", 1)[1].strip() for ln in lines if "=" in ln}
        name = fields.get("elementdatafile")
        if name is None or fields.get("headersize") not in (None, "0"):
            return None
        enc = "zlib" if fields.get("compresseddata", "false").lower() == "true" else "raw"
        if name.upper() == "LOCAL":
            return None, end, enc, 0
        if name.upper() == "LIST" or "%" in name or " " in name:
            return None
        return path.parent / name, 0, enc, 0
    return None


def _nifti_voxel_bytes(head: bytes) -> int | None:
    """Bytes per stored voxel (bitpix / 8) of a NIfTI-1/2 (or Analyze) header, None if not one.

    ITK reports a NIfTI with a scale (scl_slope) as float, whatever the stored type: the byte
    count on disk follows bitpix."""
    if len(head) < 4:
        return None
    for endian in "<>":
        (size,) = struct.unpack(endian + "i", head[:4])
        if size == 348 and len(head) >= 74:
            (bitpix,) = struct.unpack(endian + "h", head[72:74])
            return bitpix // 8 if bitpix >= 8 else None
        if size == 540 and len(head) >= 16:
            (bitpix,) = struct.unpack(endian + "h", head[14:16])
            return bitpix // 8 if bitpix >= 8 else None
    return None


def check_image_data(path: Path, reader: sitk.ImageFileReader, what: str) -> None:
    """Raise ValueError if the file at ``path`` (its header read by ``reader``) is truncated or
    corrupt, declares more voxels than it holds, or more than this machine can hold in memory."""
    if not path.is_file():
        return
    size = tuple(int(s) for s in reader.GetSize())
    nvox = int(np.prod(size, dtype=np.float64)) if size else 0
    comp = _COMPONENT_BYTES.get(reader.GetPixelID())
    if comp is None or nvox == 0:
        return
    expected = nvox * comp * max(1, reader.GetNumberOfComponents())
    declared = (f"its header declares {' x '.join(map(str, size))} voxels of "
                f"{sitk.GetPixelIDValueAsString(reader.GetPixelID())} ({_fmt_bytes(expected)})")
    fix = "copy or export the file again (the header and the data must come from the same save)"
    try:
        _check_data_bytes(path, expected, declared, fix, what, expected // comp)
    except _Incomplete as err:
        raise ValueError(f"the {what} {path} is truncated or corrupt: its compressed voxel data {err}; {fix}") from None
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror} ({err.filename})") from None
    memory = _physical_memory()
    needed = expected + 8 * nvox  # the file's voxels plus float32 copies
    if memory and needed > memory:
        raise ValueError(
            f"the {what} {path} is too large to read here: {declared}, which needs about {_fmt_bytes(needed)} "
            f"of memory, and this machine has {_fmt_bytes(memory)}; if the header is right, crop or downsample "
            "the image on a larger machine"
        )


def _check_data_bytes(path: Path, expected: int, declared: str, fix: str, what: str, values: int) -> None:
    def short(available: int, where: str = "the file") -> ValueError:
        return ValueError(
            f"the {what} {path} is truncated or its header is wrong: {declared}, but {where} holds only "
            f"{_fmt_bytes(available)} of voxel data; {fix}"
        )

    name = path.name.lower()
    if name.endswith((".jpg", ".jpeg")):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - 4096))
            if b"\xff\xd9" not in f.read():
                raise ValueError(f"the {what} {path} is truncated: its JPEG data ends without the end-of-image marker; {fix}")
        return
    if _is_gzip(path) and not name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        # A gzipped file as a whole (.nii.gz, .img.gz, ...): no deflate stream holds more than
        # about 1032 times its size, then the stream itself must be complete.
        if expected > _MAX_DEFLATE_RATIO * os.path.getsize(path):
            raise short(int(_MAX_DEFLATE_RATIO * os.path.getsize(path)), "a gzip file of this size")
        with open(path, "rb") as f:
            total, head = _stream_size(f, 0, "gzip", 540)
        offset = _nifti_vox_offset(head)
        offset = offset if offset is not None and offset >= 348 else (0 if offset is not None else None)
        stored = values * (_nifti_voxel_bytes(head) or 0) or expected
        if offset is not None and total - offset < stored:
            raise short(max(0, total - offset))
        return
    if name.endswith(".nii"):
        with open(path, "rb") as f:
            head = f.read(540)
        offset = _nifti_vox_offset(head)
        stored = values * (_nifti_voxel_bytes(head) or 0) or expected
        if offset is not None and os.path.getsize(path) - offset < stored:
            raise short(max(0, os.path.getsize(path) - offset))
        return
    if name.endswith(".hdr"):
        img = path.with_suffix(".img")
        if img.is_file() and not _is_gzip(img) and os.path.getsize(img) < expected:
            raise short(os.path.getsize(img), str(img))
        return
    layout = _layout(path)
    if layout is None:
        return
    data, offset, encoding, skip = layout
    if data is not None and not data.is_file():
        raise ValueError(f"the {what} {path} names its voxel data file {data.name}, which is missing; "
                         "keep the data file next to the header")
    holder = path if data is None else data
    if encoding != "raw" and expected > _MAX_DEFLATE_RATIO * max(1, os.path.getsize(holder) - offset):
        raise short(int(_MAX_DEFLATE_RATIO * (os.path.getsize(holder) - offset)), "compressed data of this size")
    available, _ = _available(path, data, offset, encoding, skip)
    if available < expected:
        raise short(available, "the file" if data is None else str(data))


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None
