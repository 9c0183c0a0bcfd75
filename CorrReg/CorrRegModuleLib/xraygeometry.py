"""The X-ray's camera geometry: what its node, its file (DICOM tags, a camera JSON beside it, an
NRRD header) and the ``CorrReg.Geometry`` attribute say, read from the file once per node."""

from __future__ import annotations

import logging
import math
import os

import slicer

from . import adapter


class XrayGeometryMixin:
    """Camera geometry of X-ray nodes; part of ``CorrRegLogicCore``."""

    def cameraGeometryFromNode(self, xrayNode) -> dict:
        """What the scene and the X-ray's file say about its geometry.

        Keys (each only when known): ``sdd``, ``pixelSpacing`` (dx, dy), ``principalPoint``
        (cx, cy), ``sod``, ``primaryAngle``, ``secondaryAngle``, and ``sources`` (where each came
        from). Lowest precedence first: the node's spacing, then the X-ray's file (DICOM tags,
        a side-car ``<stem>.camera.json``, a camera stored in an NRRD header; read with
        ``CorrRegLib.io.read_xray``), then the node's ``CorrReg.Geometry`` attribute.
        """
        geo: dict = {"sources": {}}
        if xrayNode is None:
            return geo
        sx, sy, _ = xrayNode.GetSpacing()
        geo["pixelSpacing"] = (float(sx), float(sy))
        geo["sources"]["pixelSpacing"] = "volume spacing"
        for key, value in self._fileGeometry(xrayNode).items():
            if key == "sources":
                geo["sources"].update(value)
            else:
                geo[key] = value
        d = adapter.geometryFromNodeAttribute(xrayNode)
        for key, name in (("sdd_mm", "sdd"), ("pixel_spacing_mm", "pixelSpacing"),
                          ("principal_point_px", "principalPoint"), ("sod_mm", "sod"),
                          ("primary_angle_deg", "primaryAngle"), ("secondary_angle_deg", "secondaryAngle")):
            if d.get(key) is not None:
                v = d[key]
                geo[name] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)
                geo["sources"][name] = f"node attribute {adapter.GEOMETRY_ATTRIBUTE}"
        return geo

    def _fileGeometry(self, xrayNode) -> dict:
        """The geometry in the X-ray's file, read once per (node, file, file modification time)."""
        path = self._xrayFilePath(xrayNode)
        if not path:
            return {}
        try:
            stat = os.stat(path)
            fileKey = (path, stat.st_mtime_ns, stat.st_size)
        except OSError:
            return {}
        cache = self.__dict__.setdefault("_geometryCache", {})
        cached = cache.get(xrayNode.GetID())
        if cached is not None and cached[0] == fileKey:
            return cached[1]
        geo: dict = {"sources": {}}
        try:
            from CorrRegLib import io as crio

            xr = crio.read_xray(path, require_camera=False)
            md = xr.metadata
            src = md.get("geometry_sources", {})
            if "sdd" in src:
                geo["sdd"] = None if xr.camera is None else xr.camera.sdd
            if xr.camera is not None:
                geo["sdd"] = xr.camera.sdd
                geo["pixelSpacing"] = tuple(xr.camera.pixel_spacing)
                if "principal_point" in src:
                    geo["principalPoint"] = tuple(xr.camera.principal_point)
            for key, name in (("sod_mm", "sod"), ("primary_angle_deg", "primaryAngle"),
                              ("secondary_angle_deg", "secondaryAngle")):
                if key in md:
                    geo[name] = float(md[key])
            for k, v in src.items():
                geo["sources"][{"sdd": "sdd", "pixel_spacing": "pixelSpacing",
                                "principal_point": "principalPoint"}.get(k, k)] = v
            if geo.get("sdd") is None:
                geo.pop("sdd", None)
        except Exception as e:  # the file is optional information; never fail on it
            logging.info(f"CorrReg: no geometry read from {path}: {e}")
        cache[xrayNode.GetID()] = (fileKey, geo)
        return geo

    @staticmethod
    def _xrayFilePath(xrayNode):
        """The file the X-ray was loaded from: its DICOM instance, else its storage node's file."""
        uids = xrayNode.GetAttribute("DICOM.instanceUIDs")
        db = getattr(slicer, "dicomDatabase", None)
        if uids and db is not None:
            try:
                path = db.fileForInstance(uids.split()[0])
                if path and os.path.exists(path):
                    return path
            except Exception:
                pass
        storage = xrayNode.GetStorageNode() if hasattr(xrayNode, "GetStorageNode") else None
        if storage is not None:
            path = storage.GetFileName()
            if path and os.path.exists(path):
                return path
        return None

    def cameraForNode(self, xrayNode, camera=None, sdd=None, pixelSpacing=None, principalPoint=None,
                      calibration=None):
        """The ``Camera`` of the X-ray: explicit values > ``camera`` > ``calibration`` > what the
        node/file say.

        ``camera`` may be a CorrRegLib Camera or a camera JSON dict; ``calibration`` a calibration
        file (``CorrRegLib.io.read_calibration``: MayaCam 2.0, OpenCV K / R / t in YAML or JSON, a
        CorrReg camera JSON), checked against the image's size. With a calibration, ``pixelSpacing``
        (default: the node's spacing) sets the physical pixel size and keeps the calibrated
        projection (the source-to-detector distance scales with it). Raises ValueError when the source-to-detector distance is not
        known or the geometry does not fit the image.
        """
        from CorrRegLib.geometry import Camera

        w, h = adapter.checkXrayNode(xrayNode)
        if isinstance(camera, dict):
            camera = Camera.from_dict(camera)
        if camera is None and calibration:
            camera = self.cameraFromCalibration(xrayNode, calibration, pixelSpacing)
            pixelSpacing = None
        geo = self.cameraGeometryFromNode(xrayNode) if camera is None else {}
        if camera is not None:
            geo.update(sdd=camera.sdd, pixelSpacing=camera.pixel_spacing, principalPoint=camera.principal_point)
            if tuple(camera.size) != (w, h):
                raise ValueError(f"the camera describes a {camera.size[0]} x {camera.size[1]} detector but the X-ray "
                                 f"'{xrayNode.GetName()}' is {w} x {h} pixels")
        if adapter.isFinitePositive(sdd):
            geo["sdd"] = float(sdd)
        if pixelSpacing is not None and all(adapter.isFinitePositive(v) for v in pixelSpacing):
            geo["pixelSpacing"] = tuple(float(v) for v in pixelSpacing)
        if principalPoint is not None and all(v is not None and math.isfinite(float(v)) and float(v) >= 0
                                              for v in principalPoint):
            geo["principalPoint"] = tuple(float(v) for v in principalPoint)
        if not adapter.isFinitePositive(geo.get("sdd")):
            raise ValueError(
                f"the camera geometry of the X-ray '{xrayNode.GetName()}' is missing: the source-to-detector "
                "distance (sdd, mm) is not known. Enter it in the 'Camera geometry' section, pass camera= or "
                "sdd= to the logic, or load the X-ray from DICOM with DistanceSourceToDetector (0018,1110) or with "
                "a <name>.camera.json beside the image")
        try:
            return Camera(sdd=geo["sdd"], pixel_spacing=tuple(geo["pixelSpacing"]), size=(w, h),
                          principal_point=geo.get("principalPoint"))
        except ValueError as e:
            raise ValueError(f"invalid camera geometry for the X-ray '{xrayNode.GetName()}': {e}") from None

    @classmethod
    def cameraFromCalibration(cls, xrayNode, path, pixelSpacing=None):
        """The ``Camera`` a calibration file gives the X-ray (ValueError with the file's problem).

        An intrinsic matrix fixes the projection, not the physical pixel size: that is
        ``pixelSpacing`` when given, else the node's spacing (the source-to-detector distance is
        fx times it)."""
        return cls.calibrationForNode(xrayNode, path, pixelSpacing).camera

    @staticmethod
    def calibrationForNode(xrayNode, path, pixelSpacing=None):
        """``CorrRegLib.io.Calibration`` of the X-ray from a calibration file: its camera (pixel
        size as in ``cameraFromCalibration``) and ``camera_from_world`` (None without extrinsics)."""
        from CorrRegLib.io import read_calibration

        w, h = adapter.checkXrayNode(xrayNode)
        if pixelSpacing is None or not all(adapter.isFinitePositive(v) for v in pixelSpacing):
            pixelSpacing = xrayNode.GetSpacing()[:2]  # how the node is shown; 1 mm for most TIFFs
        spacing = tuple(float(v) for v in pixelSpacing)
        try:
            cal = read_calibration(os.fspath(path), image_size=(w, h), pixel_spacing=spacing)
        except (OSError, ValueError) as e:
            raise ValueError(f"the calibration of the X-ray '{xrayNode.GetName()}' cannot be used: {e}") from None
        if cal.distortion is not None and any(abs(float(c)) > 0 for c in cal.distortion):
            logging.warning(f"CorrReg: {path} lists lens distortion {cal.distortion}; CorrReg models none, so the "
                            "X-ray must already be undistorted")
        return cal
