"""emostream: real-time speech emotion analysis for phone calls."""
__version__ = "0.1.0"
