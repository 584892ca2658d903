"""STSSA models: the I3D ResNet backbone, the STSSA and baseline RoI heads, the detector, checkpoint loading."""
from .checkpoint import CheckpointShapeError, LoadReport, convert_state_dict, load_backbone, read_state_dict  # noqa: F401
from .detector import ActionDetector, build_head, build_model  # noqa: F401
from .heads import BaselineHead, SlowFastAttention, STSSAHead  # noqa: F401
from .i3d import I3D, I3DConfig, i3d_r50  # noqa: F401
