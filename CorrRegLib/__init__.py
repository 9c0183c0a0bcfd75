"""CorrRegLib: correlation-driven, fully differentiable 2D/3D X-ray to CT registration.

Plain Python + PyTorch; never imports slicer, qt or vtk.
"""

__version__ = "0.1.0"
