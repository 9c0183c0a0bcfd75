"""The X-ray selector keeps the user's choice (issue 12, item 1), on a real MRML parameter node.

Slicer's GUI cannot run here, so the parameterNodeWrapper's update path is modelled on a real
vtkMRMLScriptedModuleNode, as Slicer 5.8 to 5.12 implement it
(Base/Python/slicer/parameterNodeWrapper/wrapper.py): values are cached and written inside
NodeModify; a widget change is written to the node, as the widget reads *then*, unless the
wrapper is updating the GUI; on
every ModifiedEvent the wrapper writes every parameter back to its widget; a node combo box
emits currentNodeChanged whenever its node changes, also when the wrapper sets it. The model
reproduces the defect with the old wiring (a slot on the selector's signal, connected before
the wrapper), and shows that the module's wiring (``panel.XrayGeometryFiller`` from the
parameter node's ModifiedEvent) keeps the pick and fills the fields.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CorrReg"))

from CorrRegModuleLib import adapter as A  # noqa: E402
from CorrRegModuleLib.logic import CorrRegLogicCore  # noqa: E402
from CorrRegModuleLib.panel import XrayGeometryFiller  # noqa: E402


class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, *args):
        for slot in list(self.slots):
            slot(*args)


class NodeComboBox:
    """qMRMLNodeComboBox as the wrapper sees it: setCurrentNode emits when the node changes."""

    def __init__(self):
        self.node = None
        self.currentNodeChanged = Signal()

    def setCurrentNode(self, node):
        if node is not self.node:
            self.node = node
            self.currentNodeChanged.emit(node)

    userSelects = setCurrentNode


class SpinBox:
    def __init__(self, value=0.0):
        self.value = value
        self.valueChanged = Signal()

    def setValue(self, value):
        if value != self.value:
            self.value = value
            self.valueChanged.emit(value)


class ParameterNodeModel:
    """The parameterNodeWrapper's storage and GUI update path on a real scripted module node."""

    FLOATS = {"sdd": 0.0, "pixelSpacingX": 0.0, "pixelSpacingY": 0.0, "principalPointX": -1.0,
              "principalPointY": -1.0, "sod": 0.0, "primaryAngle": 0.0, "secondaryAngle": 0.0}
    NODES = ("xrayVolume",)

    def __init__(self, scene):
        node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CorrReg")
        object.__setattr__(self, "parameterNode", node)
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_updatingGUI", False)
        object.__setattr__(self, "_guis", [])
        for name, default in self.FLOATS.items():
            node.SetParameter(name, repr(default))
        node.AddObserver("ModifiedEvent", lambda c, e: self._reread())
        self._reread()

    def _reread(self):
        n = self.parameterNode
        for name in self.FLOATS:
            self._cache[name] = float(n.GetParameter(name))
        for name in self.NODES:
            self._cache[name] = n.GetNodeReference(name)

    def __getattr__(self, name):
        if name in self.FLOATS or name in self.NODES:
            return self._cache[name]
        raise AttributeError(name)

    def __setattr__(self, name, value):
        n = self.parameterNode
        with slicer.util.NodeModify(n):
            if name in self.NODES:
                n.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                n.SetParameter(name, repr(float(value)))
            self._reread()

    def connectGui(self, widgets: dict):
        """Write each value to its widget, write widget changes back, update all widgets on Modified."""
        self._guis.append(widgets)
        for name, w in widgets.items():
            self._write(w, getattr(self, name))
            signal = w.currentNodeChanged if isinstance(w, NodeComboBox) else w.valueChanged
            # the wrapper's callback reads the widget (connector.read()), not the signal's argument
            signal.connect(lambda value, name=name, w=w: self._fromGui(name, w.node if isinstance(w, NodeComboBox)
                                                                       else w.value))
        self.parameterNode.AddObserver("ModifiedEvent", lambda c, e: self._updateGUI())

    def _fromGui(self, name, value):
        with slicer.util.NodeModify(self.parameterNode):
            if not self._updatingGUI:
                setattr(self, name, value)

    def _updateGUI(self):
        if self._updatingGUI:
            return
        object.__setattr__(self, "_updatingGUI", True)
        try:
            with slicer.util.NodeModify(self.parameterNode):
                for widgets in self._guis:
                    for name, w in widgets.items():
                        self._write(w, getattr(self, name))
        finally:
            object.__setattr__(self, "_updatingGUI", False)

    @staticmethod
    def _write(w, value):
        if isinstance(w, NodeComboBox):
            w.setCurrentNode(value)
        else:
            w.setValue(value)


def _scene_with_two_xrays():
    from CorrRegLib.geometry import Camera
    import numpy as np

    scene = slicer.vtkMRMLScene()
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    a = A.xrayNodeFromImage(scene, image, Camera(1000.0, (0.5, 0.5), (50, 40)), "X-ray A", sod=650.0)
    b = A.xrayNodeFromImage(scene, image, Camera(1200.0, (0.3, 0.3), (50, 40)), "X-ray B", sod=800.0)
    return scene, a, b


def _panel(scene, old_wiring: bool):
    p = ParameterNodeModel(scene)
    widgets = {"xrayVolume": NodeComboBox(), "sdd": SpinBox(), "pixelSpacingX": SpinBox(), "sod": SpinBox()}
    filler = XrayGeometryFiller(CorrRegLogicCore(scene))
    if old_wiring:  # before issue 12: CorrReg.py connected its slot before connectGui
        widgets["xrayVolume"].currentNodeChanged.connect(lambda node: node is not None and filler.fill(p, node))
    p.connectGui(widgets)
    if not old_wiring:  # CorrRegWidget.setParameterNode: observe the node after connecting the GUI
        filler.adopt(p)
        p.parameterNode.AddObserver("ModifiedEvent", lambda c, e: filler.onParameterNodeModified(p))
    return p, widgets


def test_the_model_reproduces_the_snap_back_of_the_old_wiring():
    scene, a, b = _scene_with_two_xrays()
    p, widgets = _panel(scene, old_wiring=True)
    widgets["xrayVolume"].userSelects(a)
    assert p.xrayVolume is None and widgets["xrayVolume"].node is None  # the first pick snapped back


def test_picking_xrays_keeps_the_choice_and_fills_the_geometry():
    scene, a, b = _scene_with_two_xrays()
    p, widgets = _panel(scene, old_wiring=False)
    combo = widgets["xrayVolume"]
    combo.userSelects(a)  # the first pick: spacing goes from 0 to a value
    assert p.xrayVolume is a and combo.node is a
    assert (p.sdd, p.pixelSpacingX, p.sod) == (1000.0, 0.5, 650.0)
    assert (widgets["sdd"].value, widgets["pixelSpacingX"].value, widgets["sod"].value) == (1000.0, 0.5, 650.0)
    combo.userSelects(b)  # an X-ray of another geometry
    assert p.xrayVolume is b and combo.node is b
    assert (p.sdd, p.pixelSpacingX, p.sod) == (1200.0, 0.3, 800.0)
    assert widgets["sdd"].value == 1200.0
    # A field edited by hand is kept while the X-ray stays the same ...
    widgets["sdd"].setValue(1111.0)
    assert p.sdd == 1111.0 and p.xrayVolume is b
    # ... and reading the geometry again is the Read-from-image button's job, not a side effect.
    combo.userSelects(a)
    assert p.xrayVolume is a and p.sdd == 1000.0
