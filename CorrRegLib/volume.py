"""The CT container: voxels with their LPS geometry, HU to attenuation, resolution pyramids.

A ``Volume`` holds a (K, J, I) tensor (SimpleITK's array order: slowest axis k first) and the
ITK geometry that maps voxel index (i, j, k) to LPS millimetres:
``lps = origin + direction @ diag(spacing) @ (i, j, k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: Linear attenuation of water (1/mm) at an effective energy of about 60 keV.
MU_WATER_PER_MM = 0.0206
#: Voxels denser than this count as bone (1.5 x water attenuation, about +500 HU).
BONE_MU_PER_MM = 1.5 * MU_WATER_PER_MM

#: The fewest voxels along each axis of a CT that can be registered (its pyramid halves it).
MIN_CT_VOXELS_PER_AXIS = 4


def hu_to_attenuation(hu: Tensor, mu_water: float = MU_WATER_PER_MM) -> Tensor:
    """Linear attenuation (1/mm) from Hounsfield units; air and below map to 0."""
    return (mu_water * (1.0 + hu / 1000.0)).clamp(min=0.0)


def attenuation_to_hu(mu: Tensor, mu_water: float = MU_WATER_PER_MM) -> Tensor:
    return (mu / mu_water - 1.0) * 1000.0


@dataclass(frozen=True)
class Volume:
    """Voxels (K, J, I) of linear attenuation in 1/mm, with ITK/LPS geometry."""

    data: Tensor
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    def __post_init__(self) -> None:
        data = self.data if isinstance(self.data, torch.Tensor) else torch.as_tensor(np.asarray(self.data))
        if data.dim() != 3:
            raise ValueError(
                f"a CT volume must be 3D, got an array of shape {tuple(data.shape)}; "
                "a 2D image is an X-ray, not a CT"
            )
        if min(data.shape) < 2:
            raise ValueError(f"a CT volume needs at least 2 voxels along each axis, got shape {tuple(data.shape)}")
        if not data.is_floating_point():
            data = data.float()
        if not torch.isfinite(data).all():
            bad = int((~torch.isfinite(data)).sum())
            raise ValueError(f"the CT contains {bad} NaN or Inf voxels; fix or mask them before registering")
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"voxel spacing must be three positive numbers in mm, got {self.spacing}")
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("the CT direction matrix must be orthonormal")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(tuple(float(v) for v in row) for row in direction))

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.data.shape
        return i, j, k

    def lps_from_index(self, dtype=torch.float64, device=None) -> Tensor:
        """4x4 affine mapping homogeneous voxel index (i, j, k, 1) to LPS mm."""
        d = torch.tensor(self.direction, dtype=torch.float64)
        m = torch.eye(4, dtype=torch.float64)
        m[:3, :3] = d @ torch.diag(torch.tensor(self.spacing, dtype=torch.float64))
        m[:3, 3] = torch.tensor(self.origin, dtype=torch.float64)
        return m.to(dtype=dtype, device=device)

    def index_from_lps(self, dtype=torch.float64, device=None) -> Tensor:
        return torch.linalg.inv(self.lps_from_index()).to(dtype=dtype, device=device)

    def center_lps(self) -> Tensor:
        """LPS position of the centre of the voxel grid's bounding box."""
        i, j, k = self.shape_ijk
        idx = torch.tensor([(i - 1) / 2, (j - 1) / 2, (k - 1) / 2, 1.0], dtype=torch.float64)
        return (self.lps_from_index() @ idx)[:3]

    def corners_lps(self) -> Tensor:
        """(8, 3) LPS corners of the volume's extent (voxel borders, half a voxel beyond centres)."""
        i, j, k = self.shape_ijk
        lo, hi = -0.5, torch.tensor([i, j, k], dtype=torch.float64) - 0.5
        pts = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.float64)
        idx = lo + pts * (hi - lo)
        m = self.lps_from_index()
        return idx @ m[:3, :3].T + m[:3, 3]

    def bone_center_lps(self, threshold: float | None = None) -> Tensor:
        """Centroid (LPS) of voxels denser than ``threshold`` (default: 1.5 x water attenuation)."""
        thr = BONE_MU_PER_MM if threshold is None else threshold
        mask = self.data > thr
        if not bool(mask.any()):
            raise ValueError("the CT has no voxels denser than soft tissue (no bone found)")
        kji = mask.nonzero().double().mean(0)
        idx = torch.tensor([kji[2], kji[1], kji[0], 1.0], dtype=torch.float64)
        return (self.lps_from_index() @ idx)[:3]

    def check_content(self, name: str = "the CT") -> None:
        """Raise ValueError if there is nothing to register in this CT: fewer than
        ``MIN_CT_VOXELS_PER_AXIS`` voxels along an axis, only air, or the same value everywhere
        (any pose would match its flat DRR equally well). ``name`` starts the message."""
        k, j, i = self.data.shape
        if min(i, j, k) < MIN_CT_VOXELS_PER_AXIS:
            raise ValueError(
                f"{name} is only {i} x {j} x {k} voxels; a CT needs at least {MIN_CT_VOXELS_PER_AXIS} voxels along "
                "each axis (is it a thumbnail, a localizer or a single slice?)"
            )
        lo, hi = float(self.data.min()), float(self.data.max())
        if hi <= 0.0:
            raise ValueError(
                f"{name} holds only air: no voxel is denser than air (-1000 HU), so its DRR is empty and there is "
                "nothing to register; check that the right file or DICOM series was given"
            )
        if hi == lo:
            hu = float(attenuation_to_hu(torch.tensor(lo)))
            raise ValueError(
                f"{name} has no structure: every voxel is {hu:.4g} HU, so every pose gives the same featureless DRR "
                "and registration cannot work; check that the right file was given"
            )

    # ---- conversions --------------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> "Volume":
        return replace(self, data=self.data.to(device=device, dtype=dtype))

    @classmethod
    def from_hu(cls, hu, spacing, origin=(0.0, 0.0, 0.0), direction=None, mu_water: float = MU_WATER_PER_MM) -> "Volume":
        t = hu if isinstance(hu, torch.Tensor) else torch.as_tensor(np.asarray(hu, dtype=np.float32))
        kwargs = {} if direction is None else {"direction": direction}
        # Validate before converting so that NaN voxels are reported, not clamped away.
        if t.dim() == 3 and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"the CT contains {bad} NaN or Inf voxels; fix or mask them before registering")
        return cls(hu_to_attenuation(t.float(), mu_water), spacing, origin, **kwargs)

    def keep_only(self, keep: Tensor) -> "Volume":
        """The CT with every voxel outside ``keep`` ((K, J, I) bool, e.g. a bone's label) set to air:
        its DRR then shows only what ``keep`` holds (one bone of a full CT)."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.data.device)
        if tuple(keep.shape) != tuple(self.data.shape):
            raise ValueError(f"the label has {tuple(keep.shape)} voxels (K, J, I) but the CT has {tuple(self.data.shape)}")
        if not bool(keep.any()):
            raise ValueError("the label keeps no voxel of the CT: check the label map and its values")
        return replace(self, data=torch.where(keep, self.data, torch.zeros_like(self.data)))

    def downsample(self, factor: int = 2) -> "Volume":
        """Average-pool by ``factor`` along each axis, keeping the physical extent."""
        if factor == 1:
            return self
        if any(-(-n // factor) < 2 for n in self.data.shape):
            k, j, i = self.data.shape
            raise ValueError(
                f"the CT ({i} x {j} x {k} voxels) is too small to downsample by {factor}: it would keep fewer than 2 "
                f"voxels along an axis; a CT needs at least {MIN_CT_VOXELS_PER_AXIS} voxels along each axis"
            )
        x = self.data[None, None]
        pad = [(-s) % factor for s in reversed(self.data.shape)]  # W, H, D order for F.pad
        x = F.pad(x, [0, pad[0], 0, pad[1], 0, pad[2]], mode="replicate")
        data = F.avg_pool3d(x, factor)[0, 0]
        spacing = tuple(s * factor for s in self.spacing)
        # The new voxel 0 centre sits at the mean of old voxels 0..factor-1.
        shift = torch.tensor([(factor - 1) / 2] * 3 + [1.0], dtype=torch.float64)
        origin = (self.lps_from_index() @ shift)[:3]
        return replace(self, data=data, spacing=spacing, origin=tuple(origin.tolist()))

    def pool_factor(self, footprint_mm: float, slack: float = 1.25) -> int:
        """The largest power-of-two :meth:`downsample` factor whose finest voxel stays within
        ``slack`` times ``footprint_mm`` (a detector pixel's size at the isocenter) and that keeps
        at least 8 voxels per axis: rendering a finer CT at that pixel size adds nothing but time."""
        factor = 1
        while (min(self.spacing) * factor * 2 <= slack * footprint_mm
               and min(self.data.shape) // (factor * 2) >= 8):
            factor *= 2
        return factor

    def pyramid(self, levels: int) -> list["Volume"]:
        """[full, /2, /4, ...] resolutions, ``levels`` entries."""
        out = [self]
        for _ in range(levels - 1):
            out.append(out[-1].downsample(2))
        return out
