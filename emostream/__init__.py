"""emostream: real-time speech emotion analysis for phone calls.

The Python API (see :mod:`emostream.api`)::

    import emostream
    model = emostream.load_model()
    result = emostream.analyze("call.flac", model=model, channel_names=("agent", "customer"))
    emostream.classify("clip.wav", model=model)
    stream = emostream.Stream(model, channels=("customer",), sample_rate=8000)

The API's names are imported on first use, so ``import emostream`` (and ``emostream.CLASSES``)
loads neither numpy nor torch.
"""

__version__ = "0.1.0"

# The model's output classes, in its logit order: the one definition every module (and the event
# format) uses. It lives here, free of imports, so the display can use it without loading numpy or torch.
CLASSES: tuple[str, ...] = ("Angry", "Disgusted", "Fearful", "Happy", "Neutral", "Sad", "Surprised")

__all__ = ["CLASSES", "__version__", "load_model", "analyze", "classify", "Stream", "Analysis"]

_API = frozenset({"load_model", "analyze", "classify", "Stream", "Analysis"})


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'emostream' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
