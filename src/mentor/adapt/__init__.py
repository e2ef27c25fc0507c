"""Test-time and source-free adaptation (``mentor.adapt``).

A test-time method adapts a trained network online while it predicts an ordered test stream, run by
``mentor adapt RUN --shift NAME`` (:mod:`mentor.engine.adapt`).
"""

from .base import TestTimeMethod

__all__ = ["TestTimeMethod"]
