"""Input checks made before anything in the scene changes: a wrong input raises ValueError."""

from __future__ import annotations

from . import adapter


def nodesOfClass(scene, className):
    n = scene.GetNumberOfNodesByClass(className)
    return [scene.GetNthNodeByClass(i, className) for i in range(n)]


class ChecksMixin:
    """Validation of the nodes a registration uses; part of ``CorrRegLogicCore``."""

    def _checkOutputTransform(self, outputTransformNode, ctNode, xrayNode, drrNode, otherXrayNodes=()):
        if outputTransformNode is None:
            return
        if not outputTransformNode.IsA("vtkMRMLLinearTransformNode"):
            raise ValueError(f"the output transform '{outputTransformNode.GetName()}' must be a linear transform node, "
                             f"got {outputTransformNode.GetClassName()}")
        parent = ctNode.GetParentTransformNode()
        while parent is not None:
            if parent is outputTransformNode or parent.GetID() == outputTransformNode.GetID():
                raise ValueError(
                    f"the output transform '{outputTransformNode.GetName()}' is already in use: it is a parent transform "
                    f"of the CT '{ctNode.GetName()}', so the result would move the CT itself. Choose or create another "
                    "transform node")
            parent = parent.GetParentTransformNode()
        allowed = {xrayNode.GetID()} | {n.GetID() for n in otherXrayNodes}
        if drrNode is not None:
            allowed.add(drrNode.GetID())
        for node in nodesOfClass(self.scene, "vtkMRMLVolumeNode"):
            if node.GetID() in allowed or node.GetAttribute(adapter.ROLE_ATTRIBUTE):
                continue
            if adapter.parentTransformID(node) == outputTransformNode.GetID():
                raise ValueError(
                    f"the output transform '{outputTransformNode.GetName()}' is already in use: it positions the volume "
                    f"'{node.GetName()}'. Choose or create another transform node")

    def _checkInputs(self, ctNode, xrayNode):
        adapter.checkCTNode(ctNode)
        adapter.checkXrayNode(xrayNode)
        if ctNode.GetID() == xrayNode.GetID():
            raise ValueError("the CT and the X-ray are the same node")
        if ctNode.GetParentTransformNode() is not None and not ctNode.GetParentTransformNode().IsLinear():
            raise ValueError(f"the CT '{ctNode.GetName()}' is under a non-linear transform; harden it first")
