"""PyTorch FSDP2 (``fully_shard``) through Accelerate's plugin: what ftlaunch adds around it.

- ``fsdp_plugin``: the plugin accelerate.yaml describes, with fp32 weights and reductions (the
  recipe's autocast does the bf16 math, as under DDP and ZeRO).
- ``share_input_embedding``: T5-style models read the input embedding through three modules
  (``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens``) that hold one tied Parameter.
  Accelerate shards ``shared`` as its own unit, and FSDP2 then refuses the other two copies
  ("shared with a parameter already managed by another FSDP group"); one module under three
  names is sharded once and gathered by its own hooks wherever it is called.
- ``root_weights_gathered``: ``generate`` runs the encoder outside the root module's forward,
  where FSDP2 would gather the root's own weights; gather them for the call.
"""

from __future__ import annotations

import contextlib
import os

import torch


def fsdp_plugin(cpu: bool):
    """FSDP2 as accelerate.yaml says (``accelerate launch`` exports it as FSDP_* variables), with an
    fp32 MixedPrecisionPolicy: Accelerate's bf16 policy would cast the sharded weights to bf16 and
    reduce gradients in bf16, so FSDP and DDP runs would not be comparable. CPU ranks offload
    without pinning (no CUDA: nothing to pin), as the ZeRO configs do."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    fp32 = {"param_dtype": torch.float32, "reduce_dtype": torch.float32, "output_dtype": torch.float32}
    os.environ.setdefault("FSDP_VERSION", "2")  # a rank started without accelerate launch
    os.environ.setdefault("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    plugin = FullyShardedDataParallelPlugin(mixed_precision_policy=fp32)
    if cpu and isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    return plugin


def share_input_embedding(model: torch.nn.Module) -> None:
    """Make every reader of the input embedding the same module (transformers' own
    ``set_input_embeddings`` does so for encoder-decoder models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    if embedding is not None:
        base.set_input_embeddings(embedding)


@contextlib.contextmanager
def root_weights_gathered(model):
    """The root's own weights gathered for a call outside its forward (a collective: every rank
    calls it, in lockstep). No-op for a module FSDP does not shard."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    # As the root's first forward would: mark it root, so its blocks do not each become one.
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        # Every unit, not only the root: generate's forwards can leave a unit that does not
        # reshard after forward (the output projection) with its whole weight registered, and a
        # converted resume's set_model_state_dict then meets a plain tensor where it expects a
        # DTensor. reshard() is not recursive; a unit already sharded is left as it is.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@contextlib.contextmanager
def all_units_unsharded(model):
    """Every unit's weights gathered once and kept so for the duration (a collective: all ranks
    enter together, and then need not stay in lockstep: no forward gathers anything), then every
    unit sharded again with its own reshard-after-forward setting (torch's
    ``set_reshard_after_forward`` would lose the root's special one: read back and restored)."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    model._get_fsdp_state()._lazy_init()
    settings = [unit_reshard_setting(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, setting in zip(units, settings):
            restore_reshard_setting(unit, setting)
            unit.reshard()


def unit_reshard_setting(unit) -> tuple:
    """What ``set_reshard_after_forward`` overwrites on one unit (torch private state)."""
    state = unit._get_fsdp_state()
    return state._auto_reshard_after_forward, [
        group.post_forward_mesh_info for group in state._fsdp_param_groups
    ]


def restore_reshard_setting(unit, setting: tuple) -> None:
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward, infos = setting
    for group, info in zip(state._fsdp_param_groups, infos):
        group.post_forward_mesh_info = info
