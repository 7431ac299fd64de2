"""Training and evaluation for emostream (``python -m train fit|cv|evaluate``)."""
