"""What the Slicer Logic tests share: the default schedule shortened for 96 px phantom X-rays,
and a start a few degrees and millimetres off (camera frame)."""

from dataclasses import replace

from CorrRegLib.register import RegistrationOptions

_DEFAULT = RegistrationOptions()
SHORT_OPTIONS = replace(_DEFAULT, patience=10,
                        levels=tuple(replace(lv, max_iterations=min(lv.max_iterations, 25)) for lv in _DEFAULT.levels))
OFFSETS = dict(initialPoseMode="carm", primaryAngle=0.0, secondaryAngle=0.0,
               rotationOffsetDeg=(3.0, -2.0, 3.0), translationOffsetMm=(6.0, -5.0, 15.0))
