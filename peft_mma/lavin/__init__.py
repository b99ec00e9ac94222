from .config import LaVINConfig
from .layer import GroupedLinear, LaVINLayer, MMAdapter
from .model import LaVINModel
from .presets import PRESETS

__all__ = ["PRESETS", "GroupedLinear", "LaVINConfig", "LaVINLayer", "LaVINModel", "MMAdapter"]
