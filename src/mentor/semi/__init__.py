"""Semi-supervised learning (``mentor.semi``): few labels and an unlabelled stream on the engine.

Methods declare ``Inputs(labeled=..., unlabeled=...)``; the engine draws the labelled batch and
``data.unlabeled_ratio * batch_size`` unlabelled images per step, with their views made on the device.
"""
