"""What one optimizer step reports (StepResult) and the metrics line of the steps since the last
one (WindowStats, metrics_row): token-weighted loss, throughput, gradient norm, summed over ranks
with one all-reduce per logged line. Rank side; metrics.py writes the line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from launcher.rank.distributed import sum_over_ranks


@dataclass
class StepResult:
    """One optimizer step, seen from this rank (tensors stay on the device until logged)."""

    loss_sum: torch.Tensor  # summed token cross-entropy of this rank's micro-batches
    target_tokens: torch.Tensor  # this rank's target tokens
    tokens: torch.Tensor  # this rank's source + target tokens (throughput)
    samples: int
    grad_norm: object = None  # a device tensor, or None where the step computed none


@dataclass
class WindowStats:
    """What happened since the last metrics line (this rank only).

    Sums stay on the device and are read once per metrics line: reading them every step
    (``.item()``) would make the host wait for the GPU and stop it queueing the next step.
    """

    loss_sum: torch.Tensor | float = 0.0  # summed token cross-entropy
    target_tokens: torch.Tensor | int = 0
    tokens: torch.Tensor | int = 0  # source + target tokens (throughput)
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, step: StepResult) -> None:
        self.loss_sum = self.loss_sum + step.loss_sum
        self.target_tokens = self.target_tokens + step.target_tokens
        self.tokens = self.tokens + step.tokens
        self.samples += step.samples


def metrics_row(
    accelerator, stats: WindowStats, step: int, epoch_progress: float, lr: float, grad_norm
) -> tuple[dict, float]:
    """The metrics line of a window, and the gradient norm summed over ranks (the same all-reduce):
    a sum any rank made inf or NaN is inf or NaN on every rank, so all ranks stop together."""
    norm = float(grad_norm) if grad_norm is not None else 0.0
    loss_sum, target_tokens, samples, tokens, norms = sum_over_ranks(
        accelerator, [stats.loss_sum, stats.target_tokens, stats.samples, stats.tokens, norm]
    )
    elapsed = max(time.perf_counter() - stats.started, 1e-9)
    row = {
        "step": step,
        "epoch": round(epoch_progress, 4),
        "loss": loss_sum / max(target_tokens, 1),  # token-weighted, like val_loss
        "lr": lr,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "elapsed_s": round(elapsed, 3),  # since the previous line: their sum is the training time
    }
    if grad_norm is not None:
        row["grad_norm"] = norm
    return row, norms
