"""Qt-free parts of the CorrReg Slicer module.

``adapter`` converts MRML nodes to CorrRegLib objects and back; ``logic`` drives a registration
on an MRML scene (the module's Logic class derives from it). Neither imports Qt, and neither
imports torch at import time, so both load in Slicer before PyTorch is installed and in plain
pytest against the ``slicer-core`` wheel.
"""
