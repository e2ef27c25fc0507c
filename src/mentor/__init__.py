"""mentor: teacher-student learning in PyTorch on one engine.

Distillation, semi-supervised learning, adaptation, generalisation and fast diffusion sampling share
one training loop (:mod:`mentor.engine`), one method contract (:mod:`mentor.methods`), one model zoo
(:mod:`mentor.models`) and on-device data (:mod:`mentor.data`).
"""

__version__ = "0.1.0"
