from .backbone import VisionBackbone, create_vision_model

__all__ = ["VisionBackbone", "create_vision_model"]
