"""Independent X-ray renderers for ``corrreg benchmark --xray-source nanodrr|diffdrr``, and the one
mapping of CorrReg's geometry onto nanodrr's and DiffDRR's (``bench_projector.py`` uses it too).

Benchmark environment only (Testing/Benchmarks/README.md): nanodrr and DiffDRR are imported
lazily, so this file imports anywhere, and a source whose renderer is missing raises ValueError
saying to use the benchmark environment. CorrRegLib.benchmark.sources loads this file by its path
(its ``SOURCES`` dict) for every source name that is not built in.

A source receives the CT **in HU** and applies its renderer's own HU conversion:

* ``nanodrr`` (0.1.7, torch backend, ``n_samples`` 500 per ray, its default): nanodrr's
  ``Subject.from_images(..., convert_to_mu=True)``, i.e. ``nanodrr.data.preprocess.hu_to_mu``:
  HU clamped at -1000, mu = 0.0192 (1 + HU/1000) /mm up to 0 HU, then linear to 0.0573 /mm at
  1000 HU (water-bone line; CorrReg's map reaches only 0.0412 /mm there): bone contrast about 1.5x
  CorrReg's, soft tissue 7 % lower.
* ``diffdrr`` (0.6.1, Siddon renderer: exact voxel-intersection lengths, nearest voxel, i.e. a
  different interpolation model from CorrReg's trilinear one): DiffDRR's own ``diffdrr.data.read``
  (``transform_hu_to_density``, bone_attenuation_multiplier 1): voxels at or below -800 HU get the
  smallest soft-tissue HU, then the volume is min-max rescaled to a density in [0, 1], so lung and
  air are 0 and the scale depends on the CT's largest HU. A density has no unit; the detector
  model needs one: the line integral is multiplied by mu_water / density(0 HU), so that water
  attenuates 0.0206 /mm as in CorrReg. Against CorrReg's map this gives zero lung, about 25 %
  more bone contrast, and a scale set by the CT's own HU range.

Geometry (derived from the peers' source and checked with point-like blobs that land on the pixel
``geometry.project_points`` predicts: Testing/Python/test_benchmark.py):

* world: both peers use the torchio/NIfTI frame, RAS: affine = diag(-1, -1, 1, 1) @
  ``Volume.lps_from_index()``, voxel data as a (1, I, J, K) view of CorrReg's (K, J, I) array;
* nanodrr: its camera frame is CorrReg's (OpenCV-like, pixel centres at u + 0.5); ``rt_inv``
  (camera to world) = F @ inv(camera_from_ct), F = diag(-1, -1, 1, 1); principal point offset
  x0 = (cx - W/2) dx, y0 = (cy - H/2) dy;
* DiffDRR (``reverse_x_axis=True``, ``orientation=None``, no re-centring): its detector column 0
  is at +x and row 0 at +y, i.e. its camera frame is CorrReg's turned 180 degrees about z; its
  pose (camera to world) = F @ inv(camera_from_ct) @ F; x0, y0 as for nanodrr.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from CorrRegLib.benchmark.sources import SourceCT, package_version  # noqa: E402
from CorrRegLib.geometry import LPS_FROM_RAS, Camera, invert_pose  # noqa: E402
from CorrRegLib.volume import MU_WATER_PER_MM, Volume  # noqa: E402

Tensor = torch.Tensor

BENCH_ENV_HINT = ("run in the benchmark environment (.bench-env/bin/corrreg benchmark ..., or "
                  ".bench-env/bin/python -m CorrRegLib.cli benchmark ...; set-up in Testing/Benchmarks/README.md)")


def require(module: str, what: str, install: str) -> None:
    """Raise ValueError naming the missing module and the benchmark environment."""
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"X-ray source {what} needs {module}, which is not installed in this Python "
                         f"({sys.executable}); {BENCH_ENV_HINT} ({install})")


# --------------------------------------------------------------------------------------------
# The geometry mapping (shared with bench_projector.py)


def ras_from_index_affine(volume: Volume) -> np.ndarray:
    """The torchio/NIfTI affine (voxel index (i, j, k) -> RAS mm) of a CorrReg volume."""
    return (LPS_FROM_RAS @ volume.lps_from_index()).numpy()  # RAS = diag(-1, -1, 1) LPS


def torchio_image(data_kji: Tensor, volume: Volume):
    """A torchio ScalarImage of voxel values (K, J, I) on ``volume``'s grid: a (1, I, J, K) view,
    the layout of a NIfTI loaded by torchio, with the RAS affine."""
    import torchio

    return torchio.ScalarImage(tensor=data_kji.float().permute(2, 1, 0)[None], affine=ras_from_index_affine(volume))


def detector_offsets_mm(camera: Camera) -> tuple[float, float]:
    """Principal point as the peers take it: offsets from the detector centre, mm (x0, y0)."""
    (dx, dy), (cx, cy) = camera.pixel_spacing, camera.principal_point
    return (cx - camera.width / 2) * dx, (cy - camera.height / 2) * dy


def nanodrr_drr(camera: Camera, device: torch.device, dtype=torch.float32):
    """nanodrr's DRR module (intrinsics only) for a CorrReg camera."""
    from nanodrr.drr import DRR

    x0, y0 = detector_offsets_mm(camera)
    dx, dy = camera.pixel_spacing
    return DRR.from_carm_intrinsics(camera.sdd, dx, dy, x0, y0, camera.height, camera.width, dtype=dtype, device=device)


def nanodrr_rt_inv(camera_from_ct: Tensor) -> Tensor:
    """nanodrr's extrinsic ``rt_inv`` (camera -> RAS world) of CorrReg poses (..., 4, 4)."""
    flip = LPS_FROM_RAS.to(dtype=camera_from_ct.dtype, device=camera_from_ct.device)
    return flip @ invert_pose(camera_from_ct)  # camera -> LPS -> RAS


def nanodrr_subject(data_kji: Tensor, volume: Volume, convert_to_mu: bool, device: torch.device):
    """A nanodrr Subject of voxel values on ``volume``'s grid: HU with nanodrr's own conversion
    (``convert_to_mu=True``) or attenuation used as is (False)."""
    from nanodrr.data import Subject

    return Subject.from_images(torchio_image(data_kji, volume), convert_to_mu=convert_to_mu).to(device)


def diffdrr_pose(camera_from_ct: Tensor) -> Tensor:
    """DiffDRR's pose matrix (its camera -> RAS world) of CorrReg poses: F inv(T) F."""
    flip = LPS_FROM_RAS.to(dtype=camera_from_ct.dtype, device=camera_from_ct.device)
    return flip @ invert_pose(camera_from_ct) @ flip


def diffdrr_subject_from_density(density_kji: Tensor, volume: Volume):
    """A DiffDRR subject whose density is given as is (e.g. CorrReg's attenuation), built by hand
    (``diffdrr.data.read`` would rescale it and re-centre the volume)."""
    import torchio

    image = torchio_image(density_kji, volume)
    return torchio.Subject(volume=image, density=image, mask=None, reorient=torch.eye(4), orientation=None,
                           fiducials=None)


def diffdrr_subject_from_hu(hu_kji: Tensor, volume: Volume):
    """DiffDRR's own subject of a CT in HU: ``diffdrr.data.read`` (its HU -> density map), in
    the CT's own RAS frame (``orientation=None``, ``center_volume=False``)."""
    from diffdrr.data import read

    return read(torchio_image(hu_kji, volume), orientation=None, center_volume=False)


def diffdrr_drr(subject, camera: Camera, renderer: str, device: torch.device, **kwargs):
    """DiffDRR's DRR module for a CorrReg camera (``reverse_x_axis=True``: see the module docstring)."""
    from diffdrr.drr import DRR

    x0, y0 = detector_offsets_mm(camera)
    dx, dy = camera.pixel_spacing
    return DRR(subject, sdd=camera.sdd, height=camera.height, width=camera.width, delx=dx, dely=dy, x0=x0, y0=y0,
               renderer=renderer, reverse_x_axis=True, **kwargs).to(device)


# --------------------------------------------------------------------------------------------
# The X-ray sources of the benchmark


class NanoDRRSource:
    """nanodrr's pure-torch backend on the CT in HU with nanodrr's own HU -> mu conversion."""

    name = "nanodrr"

    def __init__(self, n_samples: int = 500, backend: str = "torch"):
        require("nanodrr", self.name, "pip install nanodrr==0.1.7")
        from nanodrr.data import preprocess

        self.n_samples, self.backend = int(n_samples), backend
        self.mu = {"mu_water": preprocess.MU_WATER, "mu_bone": preprocess.MU_BONE, "hu_bone": preprocess.HU_BONE}

    def info(self) -> dict:
        m = self.mu
        return {
            "name": self.name, "version": package_version("nanodrr"), "backend": self.backend,
            "n_samples": self.n_samples,
            "hu_conversion": (f"nanodrr hu_to_mu (Subject convert_to_mu=True): HU clamped at -1000; "
                              f"mu = {m['mu_water']} (1 + HU/1000) /mm up to 0 HU, then linear to {m['mu_bone']} /mm "
                              f"at {m['hu_bone']:g} HU"),
        }

    def renderer(self, ct: SourceCT, camera: Camera, device: torch.device) -> Callable[[Tensor], Tensor]:
        subject = nanodrr_subject(ct.hu, ct.volume, True, device)
        drr = nanodrr_drr(camera, device)
        n, backend = self.n_samples, self.backend

        def render(pose: Tensor) -> Tensor:
            with torch.no_grad():
                rt_inv = nanodrr_rt_inv(pose.detach().to(device=device, dtype=torch.float32).reshape(1, 4, 4))
                return drr(subject, rt_inv, n_samples=n, backend=backend)[0, 0].float()

        return render


def diffdrr_water_density(hu_kji: Tensor, density_kji: Tensor) -> float:
    """The density DiffDRR's map gives 0 HU in this CT, read off its own output: the map is
    linear above -800 HU, so the line through its lowest and highest voxels there."""
    hu, d = hu_kji.reshape(-1).float(), density_kji.reshape(-1).float()
    keep = hu > -800
    if int(keep.sum()) < 2:
        raise ValueError("DiffDRR's density map needs voxels above -800 HU (soft tissue or bone); this CT has none")
    h, dd = hu[keep], d[keep]
    lo, hi = int(h.argmin()), int(h.argmax())
    if float(h[hi] - h[lo]) <= 0:
        raise ValueError("DiffDRR's density map: the CT's voxels above -800 HU all have the same value")
    slope = float(dd[hi] - dd[lo]) / float(h[hi] - h[lo])
    water = float(dd[lo]) - slope * float(h[lo])
    if not water > 0:
        raise ValueError(f"DiffDRR's density of water is {water:.3g} for this CT (not positive): cannot give it a unit")
    return water


class DiffDRRSource:
    """DiffDRR's Siddon renderer on DiffDRR's own density of the CT (``diffdrr.data.read``)."""

    name = "diffdrr"

    def __init__(self, renderer: str = "siddon", max_patch: int = 64):
        for module, install in (("diffdrr", "pip install --no-deps diffdrr==0.6.1"),
                                ("torchio", "pip install -r Testing/Benchmarks/requirements-bench.txt"),
                                ("pandas", "diffdrr.data imports it: pip install pandas")):
            require(module, self.name, install)
        self.renderer_name, self.max_patch = renderer, int(max_patch)

    def info(self) -> dict:
        return {
            "name": self.name, "version": package_version("diffdrr"), "renderer": self.renderer_name,
            "hu_conversion": ("diffdrr.data.read (transform_hu_to_density, bone multiplier 1): HU <= -800 -> the "
                              "smallest soft-tissue HU, then min-max rescaled to [0, 1]; unit: x mu_water / "
                              f"density(0 HU), mu_water = {MU_WATER_PER_MM} /mm"),
        }

    def renderer(self, ct: SourceCT, camera: Camera, device: torch.device) -> Callable[[Tensor], Tensor]:
        from diffdrr.pose import RigidTransform

        subject = diffdrr_subject_from_hu(ct.hu, ct.volume)
        scale = MU_WATER_PER_MM / diffdrr_water_density(subject.volume.data, subject.density.data)
        # Siddon holds (rays x planes) intersections at once: render in patches of <= max_patch^2 rays.
        patch = min(self.max_patch, camera.height, camera.width)
        drr = diffdrr_drr(subject, camera, self.renderer_name, device, patch_size=patch)

        def render(pose: Tensor) -> Tensor:
            with torch.no_grad():
                m = diffdrr_pose(pose.detach().to(device=device, dtype=torch.float32).reshape(1, 4, 4))
                return (drr(RigidTransform(m))[0, 0] * scale).float()

        return render


#: The sources of this file, by ``--xray-source`` name (CorrRegLib.benchmark.sources).
SOURCES: dict[str, Callable[[], object]] = {"nanodrr": NanoDRRSource, "diffdrr": DiffDRRSource}
