from .config import PRESETS, LaVINConfig
from .layer import GroupedLinear, LaVINLayer, MMAdapter
from .model import LaVINModel

__all__ = ["PRESETS", "GroupedLinear", "LaVINConfig", "LaVINLayer", "LaVINModel", "MMAdapter"]
