"""Who renders a benchmark case's X-ray: the X-ray sources.

A source turns a CT (its HU, with CorrReg's attenuation volume of the same grid), a ``Camera``
and a camera_from_ct pose (LPS mm) into the noise-free line integral of attenuation, an (H, W)
float32 image in CorrReg's pixel layout (DESIGN.md: row v from the top, column u from the left).
The benchmark then applies ``simulate.degrade`` (Poisson noise, blur, scatter, heel, window) with
the run's settings and the case's noise seed, whatever the source.

Each source applies its own HU -> attenuation conversion. That difference is the point: a real
X-ray has its own too, and a registration that only holds on its own renderer's mapping does not
hold on a user's X-ray.

Built in: ``corrreg`` (CorrReg's projector at 2 samples per voxel on ``volume.hu_to_attenuation``,
the simulator the benchmark always used). Other sources live in a *sources file*: a Python file
defining ``SOURCES: dict[str, Callable[[], XraySource]]`` (a factory per name; a factory raises
ValueError, saying what to install, when its renderer is missing). The default sources file is
``Testing/Benchmarks/xray_sources.py`` of the CorrReg checkout this package runs from (nanodrr's
torch backend and DiffDRR's Siddon renderer, benchmark environment only); ``--xray-sources FILE.py``
names another.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Protocol

import torch

from ..geometry import Camera
from ..volume import MU_WATER_PER_MM, Volume

Tensor = torch.Tensor

#: A source's renderer: camera_from_ct (4, 4) -> (H, W) float32 line integral (attenuation x mm).
Renderer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SourceCT:
    """A CT as an X-ray source receives it: the same voxel grid twice."""

    hu: Tensor  # (K, J, I) float32 Hounsfield units, as stored in the file
    volume: Volume  # CorrReg's attenuation (1/mm) of ``hu``, with the CT's LPS geometry


class XraySource(Protocol):
    """What the benchmark needs of an X-ray source."""

    name: str

    def info(self) -> dict:
        """JSON-able identity: name, version, renderer settings and a one-line ``hu_conversion``;
        it is part of the run's fingerprint, so runs of different sources never mix."""

    def renderer(self, ct: SourceCT, camera: Camera, device: torch.device) -> Renderer:
        """Set the renderer up for one CT and camera (called once per run)."""


def package_version(dist: str) -> str:
    """The installed version of a distribution, or "unknown"."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "unknown"


class CorrRegSource:
    """CorrReg's own simulator: ``Projector`` (trilinear, ``samples_per_voxel`` 2) on the CT's
    attenuation from ``volume.hu_to_attenuation`` (mu = 0.0206 (1 + HU/1000) /mm, clamped at 0)."""

    name = "corrreg"

    def __init__(self, samples_per_voxel: float = 2.0):
        self.samples_per_voxel = float(samples_per_voxel)

    def info(self) -> dict:
        return {
            "name": self.name, "version": package_version("corrreg"),
            "renderer": f"CorrRegLib.projector.Projector, {self.samples_per_voxel:g} samples per voxel",
            "hu_conversion": f"CorrRegLib.volume.hu_to_attenuation: mu = {MU_WATER_PER_MM} (1 + HU/1000) /mm, "
                             "clamped at 0 (linear through air and water)",
        }

    def renderer(self, ct: SourceCT, camera: Camera, device: torch.device) -> Renderer:
        from ..projector import Projector

        proj = Projector(ct.volume.to(device), camera, samples_per_voxel=self.samples_per_voxel).to(device)

        def render(pose: Tensor) -> Tensor:
            with torch.no_grad():
                return proj(pose.detach().to(device=proj.device, dtype=torch.float32))[0]

        return render


#: The sources every installation has.
BUILTIN_SOURCES: dict[str, Callable[[], XraySource]] = {"corrreg": CorrRegSource}


def default_sources_file() -> Path:
    """``Testing/Benchmarks/xray_sources.py`` of the checkout this package was imported from
    (an editable install or a source tree; absent from a wheel)."""
    return Path(__file__).resolve().parents[2] / "Testing" / "Benchmarks" / "xray_sources.py"


_LOADED: dict[str, ModuleType] = {}


def load_sources_file(path: str | Path) -> ModuleType:
    """Import a sources file by its path (once per process)."""
    p = Path(path).resolve()
    key = str(p)
    if key not in _LOADED:
        name = "corrreg_xray_sources_" + hashlib.sha1(key.encode()).hexdigest()[:8]
        spec = importlib.util.spec_from_file_location(name, p)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import the X-ray sources file {p}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look a module up by name
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
        _LOADED[key] = module
    return _LOADED[key]


def source_names(sources_file: str | Path | None = None) -> list[str]:
    """Names of the built-in sources and of those of the sources file (when it exists)."""
    names = list(BUILTIN_SOURCES)
    path = Path(sources_file) if sources_file else default_sources_file()
    if path.exists():
        names += [n for n in getattr(load_sources_file(path), "SOURCES", {}) if n not in names]
    return names


def get_source(name: str, sources_file: str | Path | None = None) -> XraySource:
    """The X-ray source called ``name``: built in, or from the sources file (see the module docstring).
    Raises ValueError naming the choices, or saying what to install where a renderer is missing."""
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name]()
    path = Path(sources_file) if sources_file else default_sources_file()
    if not path.exists():
        raise ValueError(
            f"X-ray source {name!r} is not built in (built in: {', '.join(BUILTIN_SOURCES)}) and the sources file "
            f"{path} does not exist; the independent renderers live in Testing/Benchmarks/xray_sources.py of a "
            "CorrReg checkout: run from the checkout, or give --xray-sources FILE.py"
        )
    sources = getattr(load_sources_file(path), "SOURCES", None)
    if not isinstance(sources, dict):
        raise ValueError(f"the X-ray sources file {path} defines no SOURCES dict (name -> factory)")
    if name not in sources:
        raise ValueError(f"unknown X-ray source {name!r}; choose from {', '.join([*BUILTIN_SOURCES, *sources])} "
                         f"(sources file {path})")
    return sources[name]()
