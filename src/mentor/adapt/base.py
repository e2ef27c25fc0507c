"""The test-time side of the Method contract: predict each test batch, adapting on the way."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..methods import Method, Refresh, StepContext
from ..nn import require_bn


class TestTimeMethod(Method):
    """A method run by the adaptation runner over ordered test streams (:mod:`mentor.engine.adapt`).

    The student is the source run's network (``model.init_from``). For each test batch the runner
    calls :meth:`adapt_step`, which returns ``"logits"`` (the predictions that are scored: made before
    or as the method adapts, as its paper prescribes) and, for a method that learns, ``"loss"`` and
    its terms as 0-d tensors; the runner then runs backward and the optimizer of :meth:`phases` on
    ``"loss"``. A step may also return ``"backward_samples"`` (0-d): how many test samples entered that
    backward pass (EATA and SAR back-propagate a filtered subset; MEMO one sample's augmentations); by
    default a step with a loss back-propagates the whole batch. ``"apply"`` (0-d bool) makes the update
    conditional: where it is false the runner leaves the parameters and the optimizer state exactly as
    they were (EATA and DeYO skip a batch whose filters keep no sample). Nothing in a step reads back to
    the host.

    ``episodic`` methods are reset to the source state before every batch; the ``reset`` setting resets
    before every stream, ``continual`` never, ``mixed`` reads every stream shuffled into one.
    ``needs_bn`` methods stop with a clear message on a network without BatchNorm.
    ``ctx.step`` counts the batches the method has seen since its last reset; ``ctx.generator`` is a
    seeded generator on the device for the method's random draws (augmentations, stochastic restore).
    """

    episodic: ClassVar[bool] = False
    needs_bn: ClassVar[bool] = False

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        if self.needs_bn:
            require_bn(student, self.method_name or type(self).__name__)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        return self.adapt_step(batch, ctx)

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Put the networks in the mode the method adapts and predicts in (called after every reset)."""
        self.eval()

    def optimizer_reset(self) -> Tensor | None:
        """Called after every update: a 0-d bool that, where true, resets the optimizers' state to a fresh
        one (a method that has just restored its source weights, SAR's model recovery); ``None`` never."""
        return None

    def on_source(self, source: Refresh) -> None:
        """Called once, before the source state is captured, with the source run's labelled training
        split (``source.labeled``, ``None`` when the runner cannot read it) and an evaluator: statistics
        a method computes from source samples (EATA's Fisher information)."""
