"""vlm: the multimodal inference engine (GGUF I/O, models, media, generation)."""
__version__ = "0.1.0"
