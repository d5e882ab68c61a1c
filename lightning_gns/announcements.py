"""What the tracker tells the user, each message once: fallbacks, what the estimate leaves out, unmeasured steps."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from lightning_gns.sources.left_out import left_out_message, low_coverage_message


class Announcements:
    """Says each message once through ``warn`` (default: :func:`warnings.warn`) and keeps them in :attr:`said`."""

    def __init__(self, warn: Callable[[str], None] | None = None) -> None:
        self.warn: Callable[[str], None] = warn if warn is not None else _python_warning
        self.said: list[str] = []
        self._left_out_said: dict[str, str] = {}  # the left-out set the last announcement reported
        self._low_coverage_said = False
        self._nothing_measured_said = False

    def __call__(self, message: str) -> None:
        if message not in self.said:
            self.said.append(message)
            self.warn(message)

    def left_out(self, left_out: dict[str, str], numels: dict[str, int], all_layers: bool) -> None:
        """One message with every left-out parameter; again (once) when more are left out later; and once a
        warning when less than half the elements are covered (``all_layers``: not a ``layers="norm"`` choice)."""
        if not left_out:
            return
        total = sum(numels.values())
        if left_out != self._left_out_said:
            updated = len(left_out.keys() - self._left_out_said.keys()) if self._left_out_said else None
            self._left_out_said = left_out
            self(left_out_message(left_out, numels, total, updated))
        covered = 1 - sum(numels[n] for n in left_out) / total if total else 1.0
        if all_layers and covered < 0.5 and not self._low_coverage_said:
            self._low_coverage_said = True
            self(low_coverage_message(covered))

    def nothing_measured(
        self,
        skipped: int,
        failure: str | None,
        mode: str | None,
        world_size: int,
        accumulation: int,
        one_example: bool | None = None,
    ) -> bool:
        """Once: no optimizer step could be measured so far (``skipped`` of them), with what may be the cause:
        the last ``failure`` of a step, or a setup without two small batches per step (``one_example``: whether
        the measured micro-batches held one example each; None if not known). True if said now."""
        if self._nothing_measured_said:
            return False
        self._nothing_measured_said = True  # once: the message's count would make every logging step new
        reasons = [] if failure is None else [failure]
        single = one_example is not False and mode == "per_example" and world_size == 1 and accumulation == 1
        if failure is None and single:
            reasons.append(
                "a micro-batch of one example on one process has a single small batch (per_example needs at least"
                " two examples per optimizer step)"
            )
        if mode == "microbatch" and accumulation < 2:
            reasons.append("mode='microbatch' needs accumulate_grad_batches >= 2")
        if failure is None:
            reasons.append(
                "non-finite gradients, batch_size_fn counts that are negative or all zero, or fewer than two small"
                " batches per step"
            )
        why = "; or ".join(reasons)
        self(
            f"GradientNoiseScale: no optimizer step could be measured so far ({skipped} skipped): {why}."
            " B_simple stays NaN until a step can be measured."
        )
        return True


def _python_warning(message: str) -> None:
    warnings.warn(message, stacklevel=3)
