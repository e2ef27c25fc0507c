"""The test-time side of the Method contract: predict each test batch, adapting on the way."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..methods import Method, StepContext


class TestTimeMethod(Method):
    """A method run by the adaptation runner over ordered test streams (:mod:`mentor.engine.adapt`).

    The student is the source run's network (``model.init_from``). For each test batch the runner
    calls :meth:`adapt_step`, which returns ``"logits"`` (the predictions that are scored: made before
    or as the method adapts, as its paper prescribes) and, for a method that learns, ``"loss"`` and
    its terms as 0-d tensors; the runner then runs backward and the optimizer of :meth:`phases` on
    ``"loss"``. Nothing in a step reads back to the host. ``episodic`` methods are reset to the source
    state before every batch; the ``reset`` setting resets before every stream.
    """

    episodic: ClassVar[bool] = False

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        return self.adapt_step(batch, ctx)

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Put the networks in the mode the method adapts and predicts in (called after every reset)."""
        self.eval()
