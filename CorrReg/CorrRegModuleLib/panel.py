"""What the module panel does in reaction to its parameter node, without Qt.

The widget calls ``XrayGeometryFiller.onParameterNodeModified`` from an observer of the parameter
node, never from the X-ray selector's ``currentNodeChanged`` signal: a slot on that signal runs
before the parameterNodeWrapper has stored the new node, and writing the geometry fields then
makes the wrapper write every parameter back to its widget, the old X-ray included, so the
selector snaps back to it. From the parameter node's ModifiedEvent the new X-ray is already
stored, and the fields follow it.
"""

from __future__ import annotations

import slicer


class XrayGeometryFiller:
    """Fills the camera-geometry parameters from the X-ray the parameter node holds, once per new X-ray."""

    def __init__(self, logic):
        self.logic = logic
        self.filledFor = None  # ID of the X-ray whose geometry the fields show
        self.lastGeometry: dict | None = None
        self.lastError: Exception | None = None

    def adopt(self, p) -> None:
        """The panel shows ``p`` as it was saved: its fields stand for its X-ray already."""
        node = p.xrayVolume if p is not None else None
        self.filledFor = node.GetID() if node is not None else None

    def onParameterNodeModified(self, p) -> dict | None:
        """Fill the fields if the X-ray changed since the last call; returns the geometry then."""
        node = p.xrayVolume
        nodeID = node.GetID() if node is not None else None
        if nodeID == self.filledFor:
            return None
        self.filledFor = nodeID
        if node is None:
            return None
        try:
            return self.fill(p, node)
        except Exception as e:  # an unreadable file must not break the panel; the label says it
            self.lastError = e
            return None

    def fill(self, p, xrayNode) -> dict:
        """Copy what the X-ray node / its file / its attribute say into the parameters."""
        geo = self.logic.cameraGeometryFromNode(xrayNode)
        with slicer.util.NodeModify(p.parameterNode):
            if geo.get("sdd"):
                p.sdd = float(geo["sdd"])
            if geo.get("pixelSpacing"):
                p.pixelSpacingX, p.pixelSpacingY = (float(v) for v in geo["pixelSpacing"])
            pp = geo.get("principalPoint")
            p.principalPointX, p.principalPointY = (float(pp[0]), float(pp[1])) if pp else (-1.0, -1.0)
            if geo.get("sod"):
                p.sod = float(geo["sod"])
            if "primaryAngle" in geo or "secondaryAngle" in geo:
                p.primaryAngle = float(geo.get("primaryAngle", 0.0))
                p.secondaryAngle = float(geo.get("secondaryAngle", 0.0))
        self.filledFor = xrayNode.GetID()
        self.lastGeometry, self.lastError = geo, None
        return geo
