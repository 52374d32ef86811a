"""Gradient accumulation under DeepSpeed: ZeRO-1 and ZeRO-2 on 2 CPU ranks x accumulation 2 train
to the plain loop's weights (tests/test_real_model.py's independent reference, 8 examples per
optimizer step), as DDP, ZeRO-2/3 without accumulation and 1 rank x accumulation 2 do there.

DeepSpeed ends an accumulation window only when told: train.train_step sets Accelerate's
``sync_gradients`` per micro-batch, which ``accelerator.backward`` passes on to
``engine.set_gradient_accumulation_boundary`` (ZeRO-1 reduces at that boundary, ZeRO-2 in every
backward) before it runs ``engine.step()``. An engine told that every micro-batch ends a window
would step twice per window, on half the examples each: far outside the tolerance.
"""

from __future__ import annotations

import pytest
from test_real_model import (
    SAME,
    final_weights,
    fine_tune,
    initial_weights,
    model_dir,  # noqa: F401 - the module-scoped fixture, used by name
    reference,  # noqa: F401 - the module-scoped fixture, used by name
    step_losses,
    update_error,
)

pytestmark = pytest.mark.slow

# (ranks, ZeRO stage, accumulation, micro batch): 2 x 2 x 2 = the reference's 8 examples per step.
SHAPES = {"zero1-accum2": (2, 1, 2, 2), "zero2-accum2": (2, 2, 2, 2)}


@pytest.mark.parametrize("name", SHAPES)
def test_zero_with_accumulation_matches_the_reference(tmp_path, model_dir, reference, name):  # noqa: F811
    weights, losses, _, _ = reference
    fine_tune(model_dir, tmp_path / "run", SHAPES[name], "fp32")
    # The logged loss is the token-mean over each whole step (both micro-batches of both ranks),
    # and the weights end where the plain loop's do, up to summation order (test_real_model.SAME).
    assert step_losses(tmp_path / "run") == pytest.approx(losses, rel=1e-5)
    assert update_error(final_weights(tmp_path / "run"), weights, initial_weights(model_dir)) < SAME
