"""Evaluation protocols of DESIGN.md: a camera, a reference view and seeded initial offsets.

A case is a ground-truth pose (the AP reference view with a small random variation) and an
initial pose (the truth perturbed by a random rotation about the isocenter and a translation,
both in the camera frame). Every method is measured on identical cases: same seed, same CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import Camera, euler_to_rotation, reference_ap_pose, rotation_about_point, transform_points

Tensor = torch.Tensor


@dataclass(frozen=True)
class Protocol:
    name: str
    camera: Camera
    sod: float
    rotation_sigma_deg: float
    translation_sigma_mm: tuple[float, float, float]
    truth_rotation_sigma_deg: float = 5.0

    def with_camera(self, camera: Camera) -> "Protocol":
        return Protocol(self.name, camera, self.sod, self.rotation_sigma_deg, self.translation_sigma_mm,
                        self.truth_rotation_sigma_deg)


PAPER_CAMERA = Camera(sdd=1011.7, pixel_spacing=(0.798, 0.798), size=(256, 256))

PROTOCOLS = {
    "paper": Protocol("paper", PAPER_CAMERA, 700.0, 20.0, (30.0, 30.0, 60.0)),
    "moderate": Protocol("moderate", PAPER_CAMERA, 700.0, 5.0, (10.0, 10.0, 20.0)),
}


def get_protocol(name: str, detector_downsample: float = 1.0) -> Protocol:
    """A named protocol, optionally with a coarser detector (same field of view)."""
    try:
        p = PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}") from None
    return p.with_camera(p.camera.downsample(detector_downsample)) if detector_downsample != 1 else p


def perturb_pose(pose: Tensor, isocenter_ct: Tensor, euler_deg, translation_mm) -> Tensor:
    """Rotate ``pose`` about the isocenter's camera-frame position by Euler angles (camera axes,
    degrees, extrinsic x-y-z) and then translate it in the camera frame (mm)."""
    pose = pose.double()
    centre = transform_points(pose, isocenter_ct.double().reshape(1, 3))[0]
    rot = euler_to_rotation(torch.as_tensor(euler_deg, dtype=torch.float64))
    delta = rotation_about_point(rot, centre, torch.as_tensor(translation_mm, dtype=torch.float64))
    return delta @ pose


@dataclass(frozen=True)
class Case:
    index: int
    true_pose: Tensor
    initial_pose: Tensor
    offset_euler_deg: tuple[float, float, float]
    offset_translation_mm: tuple[float, float, float]


def make_cases(protocol: Protocol, isocenter_ct: Tensor, n: int, seed: int = 0) -> list[Case]:
    """``n`` reproducible cases: case i depends only on (seed, i), so subsets agree."""
    cases = []
    iso = torch.as_tensor(isocenter_ct, dtype=torch.float64).reshape(3)
    reference = reference_ap_pose(iso, protocol.sod)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        truth_rot = rng.normal(0.0, protocol.truth_rotation_sigma_deg, 3)
        true_pose = perturb_pose(reference, iso, truth_rot, [0.0, 0.0, 0.0])
        euler = rng.normal(0.0, protocol.rotation_sigma_deg, 3)
        trans = rng.normal(0.0, 1.0, 3) * np.asarray(protocol.translation_sigma_mm)
        initial = perturb_pose(true_pose, iso, euler, trans)
        cases.append(Case(i, true_pose, initial, tuple(euler.tolist()), tuple(trans.tolist())))
    return cases
