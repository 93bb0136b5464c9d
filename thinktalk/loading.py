"""``thinktalk.load``: a checkpoint directory (or Hub id) → a ready model of the right family."""

from __future__ import annotations

import os

import torch

from thinktalk.checkpoint import Checkpoint, CheckpointError, StateDictSource, load_weights
from thinktalk.config import ConfigError, read_config
from thinktalk.families import ALL_COMPONENTS, family_of
from thinktalk.nn.quant import find_quant_config
from thinktalk.quantized import prepare_quantized, quantized_dtype_for


def resolve_path(path: str | os.PathLike) -> str:
    """A local checkpoint directory for ``path``: the directory itself, or a Hub id resolved by huggingface_hub."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not os.path.exists(path)
    if not looks_like_hub_id:
        raise FileNotFoundError(f"checkpoint directory '{path}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=path)
    except Exception as e:  # offline, unknown repo, no permission ...
        raise FileNotFoundError(
            f"could not fetch Hub model '{path}' ({type(e).__name__}: {e}). Without network access, download the "
            f"checkpoint elsewhere (e.g. `huggingface-cli download {path} --local-dir DIR`) and pass the local "
            "directory DIR instead."
        ) from None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"`` → torch.bfloat16 (the names of ``--dtype``); None stays None (the device's default)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build(data: dict, components: tuple[str, ...] | None = None):
    """The model described by a ``config.json`` dict, on the meta device (no memory yet)."""
    fam = family_of(data)
    if components is not None:
        unknown = set(components) - set(ALL_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)} (known: {', '.join(ALL_COMPONENTS)})")
    cfg = fam.config_class().from_hf(data)
    wanted = tuple(c for c in (components or fam.components) if c in fam.components)
    with torch.device("meta"):
        return fam.model_class()(cfg, components=wanted)


def fill(
    model,
    source: Checkpoint | StateDictSource,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool | None = None,
    weight_map=None,
    quantized: bool = False,
):
    """Assign the weights of a meta-built ``model`` from ``source`` (strict), then ready it for inference.

    ``weight_map``: the family's, unless :func:`thinktalk.quantized.prepare_quantized` extended it;
    ``quantized``: the model holds packed 4-bit layers (their scales keep float16).
    """
    built = tuple(name for name in ALL_COMPONENTS if getattr(model, name, None) is not None)
    dtype_for = lambda name: model.dtype_for(name, dtype)  # noqa: E731
    if quantized:
        dtype_for = quantized_dtype_for(dtype_for, dtype)
    load_weights(
        model,
        source,
        prefixes=tuple(f"{name}." for name in built),
        weight_map=weight_map or model.weight_map,
        dtype_for=dtype_for,
        device=device,
        tied=model.tied_weights(),
        progress=progress,
    )
    model.eval()
    model.dtype = dtype
    model.device = device
    return model


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    components: tuple[str, ...] | None = None,
    progress: bool | None = None,
    dequantize: bool = False,
    tensor_parallel_size: int = 1,
    quant_kernel: str = "plain",
):
    """Load an official Qwen2.5-Omni / Qwen3-Omni checkpoint directory.

    ``components`` limits what is built and read (e.g. ``("thinker",)`` skips the speech tensors);
    by default everything the checkpoint has is loaded. ``dtype`` defaults to bfloat16 on CUDA and
    float32 on CPU; vocoder parts stay float32.

    4-bit checkpoints (GPTQ, AWQ: a ``quantization_config`` in ``config.json``) load as they are
    published: their quantized layers keep the packed weights (see :mod:`thinktalk.quantized`);
    ``dequantize=True`` loads them as the float model instead; ``quant_kernel="int4mm"`` runs the layers
    that allow it (group size 32..256, no act-order) on torch's int4 matmul instead of dequantizing.

    ``tensor_parallel_size`` N > 1 shards the Thinker's LLM (heads, MLP columns, Qwen3's experts) over N
    processes, each reading only its slices (see :mod:`thinktalk.parallel`): called in one process, that
    process becomes rank 0 and starts the N - 1 others itself; called in each rank of a ``torch.distributed``
    job (torchrun), every rank loads its own shard.
    """
    if quant_kernel not in ("plain", "int4mm"):
        raise ValueError(f"unknown quant_kernel '{quant_kernel}' (plain, int4mm)")
    directory = resolve_path(path)
    device = torch.device(device)
    data = read_config(directory)
    quant = find_quant_config(data)
    model = build(data, components)
    source, weight_map = Checkpoint.open(directory), model.weight_map
    if quant is not None:
        source, weight_map = prepare_quantized(model, source, weight_map, quant, dequantize_all=dequantize)
    workers = None
    if tensor_parallel_size != 1:
        import torch.distributed as dist

        from thinktalk import parallel

        if tensor_parallel_size < 1:
            raise parallel.ParallelError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if dist.is_available() and dist.is_initialized():  # torchrun: every rank runs this same program
            tp = parallel.TPGroup.current(tensor_parallel_size)
            plan = parallel.shard_model(model, tp)
        else:  # this process becomes rank 0 and drives workers it starts (after the shapes are checked)
            if device.type == "cuda" and device.index not in (None, 0):
                raise parallel.ParallelError(
                    f"tensor parallelism uses cuda:0..cuda:{tensor_parallel_size - 1} (rank r on cuda:r); choose the "
                    f"GPUs with CUDA_VISIBLE_DEVICES instead of device='{device}'"
                )
            plan = parallel.shard_model(model, parallel.TPGroup(0, tensor_parallel_size))
            device = parallel.device_for_rank(device)
            options = {"dequantize": dequantize, "quant_kernel": quant_kernel}
            tp, workers = parallel.start_workers(directory, tensor_parallel_size, device, dtype, options)
        device = parallel.device_for_rank(device)
        source = parallel.ShardedSource(source, plan, weight_map)
    fill(
        model,
        source,
        device,
        dtype or default_dtype(device),
        progress,
        weight_map,
        quant is not None and not dequantize,
    )
    model.quantization = None if quant is None or dequantize else quant
    if tensor_parallel_size != 1:
        parallel.check_shards(model)
    if quant is not None and quant_kernel == "int4mm":
        from thinktalk.quantized import use_int4mm

        use_int4mm(model)
    if workers is not None:
        import atexit

        driver = parallel.Driver(tp, workers)
        model.thinker.model.mirror = driver
        model.tensor_parallel_driver = driver
        atexit.register(driver.close)
    model.checkpoint_dir = directory
    _attach_extras(model, directory)
    return model


def from_state_dict(
    config: dict,
    tensors: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    components: tuple[str, ...] | None = None,
):
    """A model from a ``config.json`` dict and tensors under checkpoint names, e.g. another implementation's
    weights in memory; tensors already in the right dtype and device are shared, not copied."""
    device = torch.device(device)
    model = build(config, components)
    fill(model, StateDictSource(tensors), device, dtype or default_dtype(device))
    model.quantization = None
    model.checkpoint_dir = None
    model.tokenizer = None
    return model


def _attach_extras(model, directory: str) -> None:
    """Tokenizer (for decoded text), speakers and generation defaults that live beside the weights."""
    model.tokenizer = None
    try:
        from thinktalk.processing.tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_pretrained(directory)
    except (ImportError, FileNotFoundError, OSError, ValueError):
        model.tokenizer = None
    if model.tokenizer is not None and model.tokenizer.eos_token_ids:
        # The end-of-turn ids are the tokenizer's: the official ones for official checkpoints, others for a
        # checkpoint with a tokenizer of its own (thinktalk-tiny).
        model.eos_token_ids = tuple(model.tokenizer.eos_token_ids)
    load_speakers = getattr(model, "load_speakers", None)
    if callable(load_speakers):
        load_speakers(directory)


__all__ = ["build", "fill", "from_state_dict", "load", "resolve_path", "CheckpointError", "ConfigError"]
