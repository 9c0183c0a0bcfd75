"""Output safety: check every output path before any work, and write outputs atomically.

* :func:`check_outputs` refuses, before a command reads or computes anything, an output that
  could not be written (a read-only folder, a folder below a regular file, an existing folder
  where a file is wanted, a format the writer does not know) or that would destroy an input (the
  same file as an input, or a file inside an input folder such as a DICOM series or a model
  directory). Two outputs that name the same file are refused too.
* :class:`OutputSet` stages outputs in hidden temporary folders next to their destinations
  (``.corrreg-partial-*``, on the same file system) and moves them all into place with
  ``os.replace`` on :meth:`OutputSet.commit`. Until then the old files stay as they were; a
  failure or an interrupt (an exception inside ``with OutputSet()``) removes what was staged and
  the folders it created, so a run never leaves a partial set of outputs that looks finished.
* :func:`atomic_path` is the one-output form that every writer of ``CorrRegLib.io`` uses.

Problems raise :class:`OutputError`, a ``ValueError`` whose message names the output, the
problem and the fix (the command line prints it as is).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Suffixes each kind of output accepts (None: any). Images are what SimpleITK writes for a 2D
#: float image (PNG, JPEG, BMP and DICOM rescaled; see docs/io.md); pictures what matplotlib saves.
FORMATS: dict[str, tuple[str, ...] | None] = {
    "file": None,
    "pose": (".json",),
    "json": (".json",),
    "transform": (".tfm", ".txt", ".h5", ".hdf5", ".mat"),
    "image": (".nrrd", ".nhdr", ".mha", ".mhd", ".nii", ".nii.gz", ".tif", ".tiff", ".png", ".jpg", ".jpeg",
              ".bmp", ".dcm"),
    "picture": (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff", ".eps"),
    "csv": (".csv",),
}
FORMATS["xray"] = FORMATS["image"]  # an image written with its <stem>.camera.json side-car

#: Side-cars a reader takes from beside an image: an X-ray's camera, a CT's geometry.
INPUT_SIDECARS = (".camera.json", ".geometry.json")

_PARTIAL_PREFIX = ".corrreg-partial-"
_PROBE_PREFIX = ".corrreg-probe-"
# Files a detached-header image writes beside its header (ITK's MetaImage and NRRD writers).
_DATA_FILES = {".mhd": (".raw", ".zraw"), ".nhdr": (".raw", ".raw.gz")}


class OutputError(ValueError):
    """An output path that cannot or must not be written (see :func:`check_outputs`)."""


@dataclass(frozen=True)
class Output:
    """One output of a command: ``label`` names it for messages (e.g. ``--drr``), ``kind`` is a
    key of :data:`FORMATS`, or ``"folder"`` for an output folder."""

    label: str
    path: PathLike | None
    kind: str = "file"


def _p(path: PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


def _suffix(path: Path) -> str:
    from .io._common import _suffix as io_suffix  # lazy: CorrRegLib.io imports this module

    return io_suffix(path)


def _real(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def _same_file(a: Path, b: Path) -> bool:
    if _real(a) == _real(b):
        return True
    try:  # hard links, case-insensitive file systems
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and _real(path).startswith(_real(folder).rstrip(os.sep) + os.sep)


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor (absolute)."""
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    return p


def companion_files(path: PathLike, sidecars: Sequence[str] = (".camera.json",)) -> list[Path]:
    """Files read or written along with an image file: its side-cars ``<stem><sidecar>`` and,
    for detached headers (.mhd, .nhdr), the voxel data file named in the header (or, for a file
    not written yet, the names ITK gives it)."""
    from .io._common import _stem

    p = _p(path)
    suf = _suffix(p)
    out = [p.parent / f"{_stem(p)}{s}" for s in sidecars]
    if suf in _DATA_FILES:
        out += [p.parent / f"{_stem(p)}{s}" for s in _DATA_FILES[suf]]
        if p.is_file():
            out += _data_files_named_in(p)
    return out


def _data_files_named_in(header: Path) -> list[Path]:
    try:
        with open(header, "rb") as f:
            text = f.read(65536).decode("latin-1")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        key, sep, value = line.partition("=" if header.suffix.lower() == ".mhd" else ":")
        key = key.strip().lower()
        if sep and key in ("elementdatafile", "data file", "datafile"):
            value = value.strip()
            if value and value.upper() not in ("LOCAL", "LIST") and " " not in value:
                out.append(header.parent / value)
    return out


def check_writable(path: PathLike, label: str = "output", folder: bool = False) -> None:
    """Refuse an output that cannot be written: an existing folder where a file is wanted (or a
    file where a folder is), a parent that is a regular file, a read-only folder or file."""
    p = _p(path)
    name = f"{label} {p}" if label else str(p)
    if os.fspath(path) == "":
        raise OutputError(f"{label}: the path is empty; give a file name")
    if folder:
        if p.exists() and not p.is_dir():
            raise OutputError(f"{name} is a file, not a folder; give a folder for this output (it is created if missing)")
    elif p.is_dir():
        raise OutputError(f"{name} is a folder; give the path of a file for this output (in that folder, say)")
    anc = _existing_ancestor(p if folder else p.parent)
    if not anc.is_dir():
        raise OutputError(f"cannot write {name}: {anc} is a file, not a folder; choose a path in a folder")
    if p.exists() and not folder and not os.access(p, os.W_OK):
        raise OutputError(f"cannot write {name}: the existing file is read-only; make it writable or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=anc)
    except OSError as err:
        raise OutputError(
            f"cannot write {name}: the folder {anc} is not writable ({err.strerror}); choose a writable folder"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_outputs(outputs: Iterable[Output], inputs: Mapping[str, PathLike | Sequence[PathLike] | None] | None = None) -> None:
    """Check every output of a command before any work; raise :class:`OutputError` if one
    cannot be written or would overwrite an input.

    ``outputs``: the files (and ``kind="folder"`` folders) the command will write; None paths
    are skipped. Image outputs (kinds "xray", "image") also cover, for .mhd/.nhdr, their data
    file, and "xray" its side-car camera JSON. ``inputs``: label -> path (or paths) of everything
    the command reads; an input's side-cars (:data:`INPUT_SIDECARS`) and detached data files
    count as inputs too, and no output may lie inside an input folder.
    """
    ins: list[tuple[str, Path]] = []
    for label, value in (inputs or {}).items():
        if value is None:
            continue
        for v in ([value] if isinstance(value, (str, os.PathLike)) else value):
            p = _p(v)
            ins.append((label, p))
            ins += [(f"{label} (its {c.name})", c) for c in companion_files(p, INPUT_SIDECARS) if c.exists()]
    written: list[tuple[str, Path]] = []
    for out in outputs:
        if out.path is None:
            continue
        if os.fspath(out.path) == "":
            raise OutputError(f"{out.label}: the path is empty; give a file or folder name")
        p = _p(out.path)
        folder = out.kind == "folder"
        files = [(out.label, p)]
        if out.kind in ("xray", "image"):
            sidecars = (".camera.json",) if out.kind == "xray" else ()
            files += [(f"{out.label} (its {c.name})", c) for c in companion_files(p, sidecars)]
        for label, f in files:
            for in_label, src in ins:
                if _same_file(f, src):
                    raise OutputError(
                        f"{label} {f} is the input {in_label}: writing it would overwrite the input; "
                        "choose another output path"
                    )
                if _inside(f, src):
                    raise OutputError(
                        f"{label} {f} lies inside the input folder {in_label} {src}; "
                        "write outputs outside the folders a command reads"
                    )
            for other_label, g in written:
                if _same_file(f, g):
                    raise OutputError(f"{label} and {other_label} name the same file {f}; give each output its own path")
            written.append((label, f))
        check_writable(p, out.label, folder=folder)
        allowed = None if folder else FORMATS[out.kind]
        if allowed is not None and not p.name.lower().endswith(allowed):
            raise OutputError(
                f"{out.label} {p}: the file name must end with {' or '.join(allowed)} "
                f"(got {_suffix(p) or 'no extension'!r}); the format follows the extension"
            )
        if out.kind == "picture":
            _require_matplotlib(out.label)


def _require_matplotlib(label: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OutputError(f"{label} needs matplotlib: pip install 'corrreg[plot]' (or drop {label})") from None


class OutputSet:
    """Outputs written together and moved into place together.

    ``path(destination)`` returns where to write ``destination`` for now: a file of the same name
    in a hidden temporary folder beside it (so detached data files and side-cars a writer adds
    next to it are staged too). ``commit()`` moves every staged file into place with
    ``os.replace``; ``abort()`` deletes them and the folders ``path`` created. Used as a context
    manager it commits on success and aborts on any exception (KeyboardInterrupt included).
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary folder, destination folder)
        self._created: list[Path] = []  # folders made for the outputs, outermost first

    def path(self, destination: PathLike, label: str = "output") -> Path:
        """Where to write ``destination`` until :meth:`commit`."""
        dest = _p(destination)
        check_writable(dest, label)
        parent = Path(os.path.abspath(dest.parent))
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                self._created.append(d)
            tmp = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=parent))
        except OSError as err:
            raise OutputError(f"cannot write {label} {dest}: {err.strerror} ({err.filename})") from None
        self._staged.append((tmp, parent))
        return tmp / dest.name

    def commit(self) -> None:
        """Move every staged file into place (replacing older files of the same name)."""
        for tmp, parent in self._staged:
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, parent / entry.name)
            tmp.rmdir()
        self._staged.clear()
        self._created.clear()

    def abort(self) -> None:
        """Delete everything staged and the folders created for it; older files stay."""
        for tmp, _ in self._staged:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(self._created):
            try:
                d.rmdir()
            except OSError:
                pass
        self._staged.clear()
        self._created.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextmanager
def atomic_path(path: PathLike, label: str = "output") -> Iterator[Path]:
    """Write one output atomically: ``with atomic_path(p) as tmp: write(tmp)``; ``p`` is
    replaced only once the block succeeds (files the writer adds beside ``tmp`` move with it)."""
    with OutputSet() as outputs:
        tmp = outputs.path(path, label)
        try:
            yield tmp
        except RuntimeError as err:  # SimpleITK's writers fail with RuntimeError: a message, not a bug
            if "SimpleITK" not in str(err):
                raise
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1])
            raise OutputError(
                f"cannot write {label} {_p(path)}: SimpleITK failed ({detail}); check the extension (the format) "
                "and the free disk space"
            ) from None
