"""What one rank's training holds (``Run``): the recipe, the prepared model, optimizer, schedule
and loader, and where training stands. Built by train.set_up; the loop (train.py) and a resume
(resume.py) work on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.core import checkpoint as ckpt
from launcher.core.recipe import Recipe
from launcher.rank.loaders import TrainingData


@dataclass
class Run:
    """Everything one rank's training holds, prepared by Accelerate."""

    recipe: Recipe
    run_dir: Path
    accelerator: object
    model: torch.nn.Module
    tokenizer: object
    optimizer: object
    scheduler: object
    loader: torch.utils.data.DataLoader
    data: TrainingData
    state: ckpt.TrainState
    total_steps: int
    batches_by_epoch: list[int]  # micro-batches per rank: a token budget packs each epoch differently
    resumed_from: str | None = None  # the checkpoint this segment of training continues
    logged_val_loss: tuple[int, float] | None = None  # (step, value): the last step's, for finish()

    def describe_batches(self) -> str:
        """``8`` (fixed-size micro-batches) or ``7-9`` (a token budget's epochs differ)."""
        low, high = min(self.batches_by_epoch), max(self.batches_by_epoch)
        return f"{low}" if low == high else f"{low}-{high}"
