"""The libraries' console noise in commands that load a model in the ftlaunch process itself
(``summarize`` on one rank, ``export``): no log file takes it there, unlike a run's ranks.

Silenced: DeepSpeed's "Setting accelerator to CPU" warning (it is imported by transformers'
integrations and probes for an accelerator), transformers' and PEFT's deprecation warnings, and
the "Loading weights" / "Writing model shards" progress bars. ``--debug`` keeps all of them.
"""

from __future__ import annotations

import os
import warnings

LIBRARIES = r"(transformers|peft|accelerate|deepspeed|torch)(\.|$)"


def quiet_libraries() -> None:
    """Call before the command imports a model library (DeepSpeed reads DS_ACCELERATOR once)."""
    if os.environ.get("FTLAUNCH_DEBUG") == "1":
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would fall back to, said
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
