from .config import LlamaAdapterV2Config
from .layer import Linear, LlamaAdapterV2Layer, Norm, OutputProjection
from .model import LlamaAdapterV2Model

__all__ = ["LlamaAdapterV2Config", "LlamaAdapterV2Layer", "LlamaAdapterV2Model", "Linear", "Norm", "OutputProjection"]
