"""Resumable checkpoints (``output_dir/checkpoint-STEP``) and the final model in the official layout.

A resumable checkpoint holds what changes during training and nothing else:

* ``model/`` + ``optim/``: the trained parameters and the optimizer state, written with
  ``torch.distributed.checkpoint`` — each process writes its own shards under FSDP2, and a run with
  the same number of processes loads them back in place (the frozen weights are the base model's);
* ``trainer_state.json``: step, scheduler, data position, the config;
* ``rng-RANK.pt``: every process's random-number generator states; ``recipe-RANK.pt``: recipe state
  (e.g. GSPO's rollout buffer).

Resuming from it continues the identical sequence of losses. The final checkpoint is the official
directory layout: the trained components' tensors under the checkpoint names of ``WEIGHT_MAPS``
(in the base checkpoint's dtypes), every other tensor copied from the base checkpoint bit for bit,
and the base's tokenizer, chat template, preprocessor configs, ``config.json`` and ``spk_dict.pt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings

import torch

from thinktalk.checkpoint import INDEX_FILE, Checkpoint, save_tensors

STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete resumable checkpoints of ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(output_dir, name)
        if m and os.path.exists(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_python_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resumable(path: str, modules, optimizer, trainable: set[str], trainer_state: dict, recipe_state: dict, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(modules, optimizer)
    model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    os.makedirs(path, exist_ok=True)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(path, "state"))
    torch.save(rng_state(), os.path.join(path, f"rng-{rank}.pt"))
    torch.save(recipe_state, os.path.join(path, f"recipe-{rank}.pt"))
    _barrier()
    if rank == 0:
        # Written last: a checkpoint without it is incomplete and never resumed from.
        with open(os.path.join(path, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(trainer_state, fh, indent=2)
    _barrier()


def load_resumable(path: str, modules, optimizer, trainable: set[str], rank: int) -> tuple[dict, dict]:
    """Load a resumable checkpoint into ``modules``/``optimizer``; returns (trainer state, recipe state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        trainer_state = json.load(fh)
    if trainer_state.get("world_size", 1) != _world():
        raise RuntimeError(
            f"{path} was written by {trainer_state.get('world_size')} process(es); resume it with as many "
            f"(this run has {_world()})"
        )
    model_sd, optim_sd = get_state_dict(modules, optimizer)
    model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(
        modules, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )
    rng_file = os.path.join(path, f"rng-{rank}.pt")
    set_rng_state(torch.load(rng_file, weights_only=True))
    recipe_state = torch.load(os.path.join(path, f"recipe-{rank}.pt"), weights_only=True)
    return trainer_state, recipe_state


def prune(output_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns that it runs in one process when it does; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- the final checkpoint -----------------------------------------------------------------------------


def full_state(modules) -> dict[str, torch.Tensor]:
    """Every tensor of the trained components, whole and on CPU (gathered to rank 0 under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(modules, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_model(output_dir: str, base_dir: str, model, state: dict[str, torch.Tensor], components: tuple[str, ...]) -> None:
    """The official layout: ``state`` (module names of ``components``) + the base's other tensors and files."""
    if os.path.abspath(output_dir) == os.path.abspath(base_dir):
        raise ValueError("output_dir is the base checkpoint itself: choose another directory")
    base = Checkpoint.open(base_dir)
    base_names = set(base.names())
    tensors: dict[str, torch.Tensor] = {}
    tied = {t for t, _ in model.tied_weights().items()}
    for name, t in state.items():
        if name in tied:
            continue  # stored once, under the tensor it is tied to (like the reference)
        for key, piece in model.weight_map.checkpoint_tensors(name, t):
            if key in base_names and piece.is_floating_point():
                piece = piece.to(base.dtype(key))
            tensors[key] = piece
    trained = tuple(f"{c}." for c in components)
    for name in base.names():
        if not name.startswith(trained) or (name not in tensors and model.weight_map.ignored(name)):
            tensors[name] = base.tensor(name)
    missing = sorted(base_names - set(tensors))
    if missing:
        raise RuntimeError(f"the trained model lacks checkpoint tensors: {', '.join(missing[:10])}")
    for stale in ("model.safetensors", INDEX_FILE):
        if os.path.exists(os.path.join(output_dir, stale)):
            os.remove(os.path.join(output_dir, stale))
    save_tensors(tensors, output_dir)
    copy_extras(base_dir, output_dir)


# What a training run writes beside its model: when the base checkpoint is itself a run's output (stage2 -> sft),
# these are that run's records, not part of the model, and must not overwrite the new run's own.
RUN_FILES = frozenset({"metrics.jsonl", "train_config.yaml", "curves.png"})


def copy_extras(base_dir: str, output_dir: str) -> None:
    """Every top-level file of the base checkpoint except its weights and run records (config, tokenizer, speakers ...)."""
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(base_dir)):
        src = os.path.join(base_dir, name)
        if not os.path.isfile(src) or name.endswith(".safetensors") or name == INDEX_FILE or name in RUN_FILES:
            continue
        shutil.copyfile(src, os.path.join(output_dir, name))
