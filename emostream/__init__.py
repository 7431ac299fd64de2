"""emostream: real-time speech emotion analysis for phone calls."""
__version__ = "0.1.0"

# The model's output classes, in its logit order: the one definition every module (and the event
# format) uses. It lives here, free of imports, so the display can use it without loading numpy or torch.
CLASSES: tuple[str, ...] = ("Angry", "Disgusted", "Fearful", "Happy", "Neutral", "Sad", "Surprised")

# The shipped model (its model.json is the model card's source of figures; the report quotes it).
from pathlib import Path as _Path

DEFAULT_CHECKPOINT = _Path(__file__).resolve().parent.parent / "checkpoints" / "emostream-resnet50"
