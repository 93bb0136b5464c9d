"""Processes, devices and FSDP2 sharding for the trainer.

``torchrun --nproc-per-node N -m thinktalk train CONFIG.yaml`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
with more than one process the trainer joins a process group (NCCL on GPUs, gloo on CPUs) and shards
the trained components with FSDP2 (``fully_shard``): one unit per decoder layer (Thinker LLM, Talker, code predictor; always run by
every process) and the rest — embeddings, LM head, encoders — in the root unit, so every process
issues the same collectives whatever media its micro-batch holds.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this trainer created the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun with several processes; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_name)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(rank=rank, world=world, local_rank=local, owns_group=owns), device


def finish(info: Dist, timeout_s: float = 60.0) -> None:
    """The end of a run that succeeded: every rank meets at a barrier, ends its process group, and waits (on the
    launcher's key-value store, which outlives the group) until every rank has ended its own before it exits.

    gloo aborts a process (SIGABRT) whose peer closes a connection while its own is still open; seen once in a few
    CI runs with one barrier before the teardown (each rank then tore down, and exited, on its own time)."""
    if not (info.world > 1 and dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if not info.owns_group:
        return  # the caller's group: the caller ends it
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store to meet on: end the group as before
        store = None
    dist.destroy_process_group()
    if store is None:
        return
    key = "thinktalk/groups_closed"
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while int(store.add(key, 0)) < info.world and time.monotonic() < deadline:
        time.sleep(0.02)


def shutdown(info: Dist) -> None:
    """End the process group if this trainer created it and it is still there (:func:`finish` ends it on success)."""
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


LAYER_LISTS = ("thinker.model.layers", "talker.model.layers", "talker.code_predictor.model.layers")


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The decoder layers inside ``module`` (the units of sharding and activation checkpointing): the
    Thinker's LLM, the Talker's decoder and (Qwen3-Omni) its code predictor's."""
    layers = []
    for name, m in module.named_modules():
        if name.endswith(LAYER_LISTS) and isinstance(m, nn.ModuleList):
            layers.extend(m)
    return layers


def apply_activation_checkpointing(module: nn.Module) -> int:
    """Recompute each decoder layer's activations in backward instead of keeping them (names unchanged)."""
    from torch.distributed._composable import checkpoint

    layers = decoder_layers(module)
    for layer in layers:
        checkpoint(layer)
    return len(layers)


def shard(module: nn.Module) -> None:
    """FSDP2: one unit per decoder layer, the rest of ``module`` in the root unit."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(module):
        fully_shard(layer)
    fully_shard(module)


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(module: nn.Module):
    """Whole (unsharded) weights for code that calls sub-modules directly, e.g. ``model.generate``.

    Every FSDP unit is gathered once and kept gathered inside the block, so generation loops issue no
    collectives (processes may decode different numbers of steps); afterwards they are sharded again.
    """
    units = fsdp_modules(module)
    if not units:
        yield
        return
    # Sub-modules are about to run outside the root's forward: initialise the root first, or the
    # first unit called would make itself a root.
    module._get_fsdp_state()._lazy_init()
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
