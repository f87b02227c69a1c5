"""vlm: the multimodal inference engine (GGUF I/O, models, media, generation).

    import vlm
    m = vlm.load("model.gguf")                     # -> vlm.Model
    m.generate("Hello", max_tokens=32, temperature=0)
    m.forward(vlm.Batch().add_text(m.tokenize("Hi"), pos=0, logits=True))
"""
__version__ = "0.1.0"

from vlm.batch import Batch  # noqa: E402  (light: torch only)


def __getattr__(name):
    # `load` / `Model` pull in the model code lazily, so `import vlm` stays cheap for the CLI and tools.
    if name in ("load", "Model"):
        from vlm import model
        return getattr(model, name)
    raise AttributeError(f"module 'vlm' has no attribute {name!r}")


__all__ = ["Batch", "Model", "load", "__version__"]
