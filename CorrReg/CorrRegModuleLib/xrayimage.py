"""The X-ray as it comes: which polarity and field of view ``start()`` asks for, checked on the
main thread before the scene changes, and the words the run reports about them.

The image itself is made ready in the worker (``CorrRegLib.preprocess.prepare_image``: the
field-of-view mask, then the polarity), off the GUI thread: detecting an intensifier's disc
on a 1760 px image takes a second or two. The X-ray node's pixels are never modified.
Only the node checks import slicer (the worker, which imports none, uses preparationNote).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: "auto": detected (CorrRegLib.polarity.detect_polarity); "bright": used as stored; "dark":
#: inverted (log for a raw transmission image, linear for an inverted log image). The same as
#: CorrRegLib.preprocess.POLARITY_MODES, written out so that the Logic imports without torch.
POLARITIES = ("auto", "bright", "dark")
#: "auto": the intensifier's disc, collimator blades and burned-in borders are detected
#: (CorrRegLib.fov_mask); "none": every pixel is used. A label map node is a user's mask.
FIELDS_OF_VIEW = ("auto", "none")


@dataclass
class OtherView:
    """One more calibrated X-ray of the same moment (biplane): its node, its calibration file
    (with the camera's pose in the calibration's world, as the reference view's), and how its
    image is taken (``polarity``, ``fieldOfView``: as ``start()``'s). Its pixel size is the
    node's spacing unless ``pixelSpacing`` is given."""

    xrayNode: object
    calibration: object
    polarity: str = "auto"
    fieldOfView: object = "auto"
    pixelSpacing: tuple | None = None


def polarityFrom(polarity: str, invertXray: bool = False) -> str:
    """The polarity to apply: ``invertXray=True`` (the old check box) means "dark"."""
    polarity = str(polarity).lower()
    if polarity not in POLARITIES:
        raise ValueError(f"unknown X-ray polarity {polarity!r}; choose one of {', '.join(POLARITIES)}")
    if invertXray:
        if polarity == "bright":
            raise ValueError("invertXray=True says bone is dark in the X-ray, but polarity='bright' says it is "
                             "bright: give one of them")
        return "dark"
    return polarity


def maskArrayFromNode(maskNode, xrayNode) -> np.ndarray:
    """bool (H, W): the usable pixels of the X-ray (True where the mask node is non-zero).

    The mask is a 2D label map (or scalar volume) of exactly the X-ray's pixels, for instance a
    segment drawn on the X-ray and exported as a label map; its geometry is not used, only its
    pixel grid, since the registration places the X-ray node on the detector plane."""
    from . import adapter

    w, h = adapter.checkXrayNode(xrayNode)
    name = maskNode.GetName()
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"the field-of-view mask '{name}' is a segmentation: export its segment to a label map "
                         "(Data module: right-click the segmentation, 'Export visible segments to binary labelmap') "
                         "and choose that label map")
    if not maskNode.IsA("vtkMRMLScalarVolumeNode") or maskNode.GetImageData() is None:
        raise ValueError(f"the field-of-view mask '{name}' must be a label map volume of the X-ray's pixels, "
                         f"got {maskNode.GetClassName()}")
    i, j, k = (int(d) for d in maskNode.GetImageData().GetDimensions())
    if (i, j, k) != (w, h, 1):
        raise ValueError(f"the field-of-view mask '{name}' is {i} x {j} x {k} pixels but the X-ray "
                         f"'{xrayNode.GetName()}' is {w} x {h}: draw the mask on the X-ray itself (same size; "
                         "non-zero = use, zero = ignore)")
    arr = np.asarray(adapter.arrayFromVolume(maskNode))
    m = (arr != 0).reshape(arr.shape[0], arr.shape[1], arr.shape[2], -1).any(-1)[0]
    if not m.any():
        raise ValueError(f"the field-of-view mask '{name}' is all zero: it excludes every pixel "
                         "(non-zero = use, zero = ignore)")
    return m


def fieldOfViewFrom(fieldOfView, xrayNode):
    """"auto", "none", or a bool (H, W) array from a mask node / array (checked against the X-ray)."""
    if fieldOfView is None:
        return "none"
    if isinstance(fieldOfView, str):
        fov = fieldOfView.lower()
        if fov not in FIELDS_OF_VIEW:
            raise ValueError(f"unknown field of view {fieldOfView!r}; choose one of {', '.join(FIELDS_OF_VIEW)} "
                             "or give a label map node of the X-ray's pixels")
        return fov
    if hasattr(fieldOfView, "IsA"):
        return maskArrayFromNode(fieldOfView, xrayNode)
    from . import adapter

    w, h = adapter.checkXrayNode(xrayNode)
    m = np.asarray(fieldOfView)
    if m.shape != (h, w):
        raise ValueError(f"the field-of-view mask is {m.shape} but the X-ray '{xrayNode.GetName()}' is (H, W) = "
                         f"({h}, {w})")
    m = m != 0
    if not m.any():
        raise ValueError("the field-of-view mask is all zero: it excludes every pixel")
    return m


def preparationNote(info: dict, inverted: bool, name: str | None = None) -> str:
    """One line on what was done to the X-ray (``prepare_image``'s info), for the status and
    result; ``name`` names it (biplane: one line per view)."""
    pol = info.get("polarity", {})
    if inverted:
        text = f"bone dark, inverted ({pol.get('inversion', 'log')})"
    else:
        text = "bone bright, used as stored"
    if pol.get("mode") == "auto":
        text += f" (detected, {pol.get('confidence', 'low')} confidence)"
    else:
        text += " (as asked)"
    fov = info.get("fov_mask", {})
    share = fov.get("usable_fraction")
    if fov.get("mask") == "none":
        text += "; every pixel used"
    elif fov.get("mask") == "auto":
        kind = fov.get("kind", "none")
        text += ("; no field-of-view edge found, every pixel used" if kind == "none"
                 else f"; field of view detected ({kind.replace('+', ' and ')}), {100 * share:.0f} % of the image used")
    else:
        text += f"; the given mask, {100 * share:.0f} % of the image used"
    return (f"X-ray '{name}': " if name else "X-ray: ") + text
