"""Scenes for the module's self-test (``CorrRegTest`` in Slicer) and for the pytest suites.

``buildPhantomCase`` puts a procedural spine CT and a realistically degraded simulated X-ray of it
(known true pose) into an MRML scene; ``runSelfTest`` registers them through the Logic and
reports the target registration error on the phantom's landmarks.
"""

from __future__ import annotations

import numpy as np

from . import adapter

#: The paper's C-arm: sdd 1011.7 mm, 256 px at 0.798 mm, sod 700 mm.
PAPER_SDD = 1011.7
PAPER_SOD = 700.0
PAPER_DETECTOR_MM = 256 * 0.798


def buildPhantomCase(scene, size: int = 96, spacing_mm: float = 3.0, seed: int = 0,
                     angles=(4.0, -3.0), dose: float = 3e4, phantom=None):
    """Phantom CT node + simulated X-ray node (``size`` x ``size`` px, the paper's detector
    extent) in ``scene``. Returns a dict with the nodes, the camera, the true pose and the
    phantom (its landmarks are the targets)."""
    import torch
    from CorrRegLib.geometry import Camera, c_arm_pose
    from CorrRegLib.phantom import make_spine_phantom

    ph = phantom if phantom is not None else make_spine_phantom(spacing_mm=spacing_mm, seed=seed)
    camera = Camera(PAPER_SDD, (PAPER_DETECTOR_MM / size,) * 2, (size, size))
    iso = ph.volume.bone_center_lps()
    truePose = c_arm_pose(iso, PAPER_SOD, float(angles[0]), float(angles[1]))
    image = simulateXray(ph.volume, camera, truePose, dose=dose, seed=seed)
    ctNode = adapter.volumeNodeFromArray(scene, ph.hu, ph.volume.spacing, ph.volume.origin, ph.volume.direction,
                                         scene.GenerateUniqueName("CorrReg phantom CT"))
    xrayNode = adapter.xrayNodeFromImage(scene, image, camera, scene.GenerateUniqueName("CorrReg simulated X-ray"),
                                         sod=PAPER_SOD)
    return {"ct": ctNode, "xray": xrayNode, "camera": camera, "truePose": truePose.to(torch.float64),
            "phantom": ph, "image": image}


def simulateXray(volume, camera, pose, dose=3e4, seed=0):
    """A degraded X-ray (noise, blur, log/contrast) from CorrRegLib.simulate; a plain DRR with
    noise if that module is unavailable."""
    import torch

    try:
        from CorrRegLib.simulate import simulate_xray
    except ImportError:
        simulate_xray = None
    if simulate_xray is not None:
        return simulate_xray(volume, camera, pose, dose=dose, seed=seed).image.detach().cpu().float()
    from CorrRegLib.projector import render

    img = render(volume, camera, pose)[0]
    g = torch.Generator().manual_seed(seed)
    return img + 0.01 * float(img.max()) * torch.randn(img.shape, generator=g)


def mTRE(poseA, poseB, points) -> float:
    """Mean distance (mm) between the points mapped by two camera_from_ct poses."""
    import torch
    from CorrRegLib.geometry import transform_points

    a = transform_points(torch.as_tensor(poseA, dtype=torch.float64), points.double())
    b = transform_points(torch.as_tensor(poseB, dtype=torch.float64), points.double())
    return float((a - b).norm(dim=-1).mean())


def runSelfTest(logic, scene, method: str = "intensity", log=print, size: int = 96,
                rotationOffsetDeg=(3.0, -2.0, 3.0), translationOffsetMm=(6.0, -5.0, 15.0),
                tolerance_mm: float = 2.0, options=None, phantom=None, background: bool = False) -> dict:
    """Register a simulated X-ray to the phantom through ``logic.register`` and report errors
    (``background``: in the worker thread, as the GUI runs it)."""
    import torch

    log("Building the phantom CT and a simulated X-ray")
    case = buildPhantomCase(scene, size=size, phantom=phantom)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName("CorrReg self-test pose"))
    targets = case["phantom"].landmarks
    log(f"Registering ({method})")
    result = logic.register(case["ct"], case["xray"], transform, method=method, initialPoseMode="carm",
                            rotationOffsetDeg=rotationOffsetDeg, translationOffsetMm=translationOffsetMm,
                            primaryAngle=0.0, secondaryAngle=0.0, options=options, background=background)
    estimate = torch.from_numpy(adapter.poseArrayFromTransformNode(transform))
    initial = logic.currentRun.options.initialPose
    report = {
        "method": method,
        "initial_mTRE": mTRE(initial, case["truePose"], targets),
        "mTRE": mTRE(estimate, case["truePose"], targets),
        "iterations": result.iterations,
        "runtime_s": result.runtime_s,
        "tolerance_mm": tolerance_mm,
        "transform": transform,
        "case": case,
        "result": result,
    }
    log(f"mTRE {report['initial_mTRE']:.1f} mm -> {report['mTRE']:.2f} mm in {result.runtime_s:.1f} s")
    return report


def checkAdapterRoundTrip(scene) -> None:
    """Oblique CT node -> Volume -> node, and pose -> transform node -> pose, must be exact."""
    import torch
    from CorrRegLib.geometry import c_arm_pose, euler_to_rotation

    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1500, (6, 7, 8)).astype(np.float32)
    direction = euler_to_rotation(torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)).numpy()
    node = adapter.volumeNodeFromArray(scene, hu, (0.7, 0.8, 1.5), (12.0, -30.0, 45.0), direction, "round trip")
    volume = adapter.volumeFromNode(node)
    again = adapter.volumeNodeFromVolume(scene, volume, "round trip again")
    if not np.array_equal(adapter.ijkToRASArray(node), adapter.ijkToRASArray(again)):
        raise AssertionError("IJKToRAS changed in a Volume round trip")
    from slicer.util import arrayFromVolume

    if not np.allclose(arrayFromVolume(again), hu, atol=1e-2):
        raise AssertionError("voxel values changed in a Volume round trip")
    pose = c_arm_pose([1.0, 2.0, 3.0], 700.0, 20.0, -10.0)
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "round trip pose")
    adapter.setTransformNodeFromPose(t, pose)
    if not np.allclose(adapter.poseArrayFromTransformNode(t), pose.numpy(), atol=1e-12):
        raise AssertionError("pose changed in a transform node round trip")
    for n in (node, again, t):
        scene.RemoveNode(n)
