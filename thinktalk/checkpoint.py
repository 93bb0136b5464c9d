"""Checkpoint I/O: (sharded) safetensors reading and writing, and the weight-name maps.

Loading is boring on purpose: build the modules on the meta device, then for every parameter read
its tensor (memory-mapped by safetensors), cast it, move it and assign it — one copy in its final
place. Names are checked strictly both ways: a missing tensor or a tensor nobody claimed is an error
listing the names. ``WEIGHT_MAPS`` is the single place that knows how checkpoint names differ from
module names (for Qwen2.5-Omni they do not: our modules use the checkpoint's names).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint directory that does not match the model built from its config."""


@dataclass(frozen=True)
class Stacked:
    """Checkpoint tensors that are slices of one stacked module tensor (MoE experts stored one by one).

    ``checkpoint`` and ``module`` are name templates over ``{prefix}`` (a dotted path) and ``{index}``:
    checkpoint tensor ``checkpoint.format(prefix=p, index=i)`` holds rows ``[part·r, (part+1)·r)`` of
    ``module.format(prefix=p)[i]``, where r = rows / ``parts``. Loading writes every slice straight
    into the stacked tensor (one copy); saving splits it back.
    """

    checkpoint: str
    module: str
    part: int = 0
    parts: int = 1

    def _pattern(self, template: str) -> re.Pattern:
        escaped = re.escape(template).replace(r"\{prefix\}", r"(?P<prefix>.+)").replace(r"\{index\}", r"(?P<index>\d+)")
        return re.compile(f"^{escaped}$")

    def match_checkpoint(self, name: str) -> tuple[str, int] | None:
        """(module name, index) when ``name`` is one of these slices."""
        m = self._pattern(self.checkpoint).match(name)
        return (self.module.format(prefix=m["prefix"]), int(m["index"])) if m else None

    def split(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """The checkpoint (name, slice) pairs of module tensor ``name``, or None when it is not stacked."""
        m = self._pattern(self.module).match(name)
        if m is None:
            return None
        rows = tensor.shape[1] // self.parts
        sl = slice(self.part * rows, (self.part + 1) * rows)
        return [(self.checkpoint.format(prefix=m["prefix"], index=i), tensor[i, sl]) for i in range(tensor.shape[0])]


@dataclass(frozen=True)
class WeightMap:
    """How checkpoint tensor names map to module parameter names for one family.

    ``rename``: (checkpoint regex, module replacement) applied in order when loading, reversed when saving.
    ``ignore``: checkpoint names that exist but no module uses (never loaded, never an error).
    ``stacked``: per-index checkpoint tensors gathered into one module tensor (see :class:`Stacked`).
    """

    rename: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    reverse: tuple[tuple[str, str], ...] = ()
    stacked: tuple[Stacked, ...] = ()

    def stack_target(self, name: str) -> tuple[str, int, int, int] | None:
        """(module name, index, part, parts) when checkpoint tensor ``name`` is a slice of a stacked tensor."""
        for rule in self.stacked:
            hit = rule.match_checkpoint(name)
            if hit is not None:
                return hit[0], hit[1], rule.part, rule.parts
        return None

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The checkpoint (name, tensor) pairs that module tensor ``name`` is saved as."""
        pieces = [p for rule in self.stacked if (p := rule.split(name, tensor)) is not None]
        if pieces:
            return [pair for p in pieces for pair in p]
        return [(self.to_checkpoint(name), tensor)]

    def to_module(self, name: str) -> str:
        for pattern, repl in self.rename:
            name = re.sub(pattern, repl, name)
        return name

    def to_checkpoint(self, name: str) -> str:
        for pattern, repl in self.reverse:
            name = re.sub(pattern, repl, name)
        return name

    def ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignore)


WEIGHT_MAPS: dict[str, WeightMap] = {
    # The reference (transformers 5.23) saves Qwen2.5-Omni under the official names, which our modules use.
    "qwen2_5_omni": WeightMap(),
    # Qwen3-Omni: official names too, except the MoE experts (Thinker and Talker): the checkpoint (official
    # and as the reference saves it) has one gate/up/down matrix per expert, our modules one stacked
    # tensor per projection (gate and up rows fused) so the experts run as grouped matrix products.
    "qwen3_omni_moe": WeightMap(
        stacked=(
            Stacked("{prefix}.mlp.experts.{index}.gate_proj.weight", "{prefix}.mlp.experts.gate_up_proj", part=0, parts=2),
            Stacked("{prefix}.mlp.experts.{index}.up_proj.weight", "{prefix}.mlp.experts.gate_up_proj", part=1, parts=2),
            Stacked("{prefix}.mlp.experts.{index}.down_proj.weight", "{prefix}.mlp.experts.down_proj"),
        )
    ),
}


@dataclass
class Checkpoint:
    """The tensors of a checkpoint directory: ``model.safetensors`` or shards listed by the index."""

    directory: str
    files: dict[str, str] = field(default_factory=dict)  # tensor name -> file path
    _handles: dict[str, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Checkpoint:
        directory = os.fspath(directory)
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        files: dict[str, str] = {}
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise CheckpointError(f"{index} is not valid JSON: {e}") from None
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map'")
            for name, file in weight_map.items():
                files[name] = shard_path(directory, file, index, name)
            missing_files = sorted({p for p in files.values() if not os.path.isfile(p)})
            if missing_files:
                raise CheckpointError(f"shards listed in {index} are missing: {', '.join(missing_files)}")
        elif os.path.exists(single):
            with _opened(single) as f:
                files = {name: single for name in f.keys()}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in '{directory}'")
        return cls(directory=directory, files=files)

    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, path: str):
        if path not in self._handles:
            self._handles[path] = _opened(path)
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        sl = self._handle(self.files[name]).get_slice(name)
        n = 1
        for s in sl.get_shape():
            n *= s
        sizes = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
        return n * sizes.get(sl.get_dtype(), 4)

    def tensor(self, name: str) -> torch.Tensor:
        path = self.files[name]
        try:
            return self._handle(path).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' errors do not say which file (a shard cut short, bad offsets)
            raise CheckpointError(f"cannot read tensor '{name}' from '{path}': {e}") from None

    def tensor_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (``dim`` 0) or columns (``dim`` 1) ``[start, stop)`` of tensor ``name``, reading only those bytes
        (what a tensor-parallel rank loads)."""
        path = self.files[name]
        try:
            sl = self._handle(path).get_slice(name)
            index = (slice(start, stop),) if dim == 0 else (slice(None),) * dim + (slice(start, stop),)
            return sl[index]
        except Exception as e:
            raise CheckpointError(f"cannot read a slice of tensor '{name}' from '{path}': {e}") from None

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name`` (read from the header, not the data)."""
        code = self._handle(self.files[name]).get_slice(name).get_dtype()
        table = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}  # fmt: skip
        return table[code]


def shard_path(directory: str, file, index: str, tensor: str) -> str:
    """The path of a shard the index names, which must be a plain relative path inside ``directory``.

    The index is data from the checkpoint's author: ``"../../etc/passwd"`` or an absolute path must not
    make the loader open files elsewhere. (Symlinked shards, as in the Hub cache, are fine: the check is
    on the name the index gives, not on where a link inside the directory points.)
    """
    if not isinstance(file, str) or not file or "\x00" in file:
        raise CheckpointError(f"{index}: tensor '{tensor}' names an invalid shard file {file!r}")
    norm = os.path.normpath(file)
    if os.path.isabs(file) or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise CheckpointError(
            f"{index}: tensor '{tensor}' names the shard '{file}', which is outside the checkpoint directory"
        )
    return os.path.join(directory, norm)


def _opened(path: str):
    """``safe_open(path)``, with the file named when it is truncated or not safetensors at all."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError ("incomplete metadata, file not fully covered"), OSError
        size = os.path.getsize(path) if os.path.exists(path) else None
        detail = f" ({size} bytes)" if size is not None else ""
        raise CheckpointError(f"cannot read safetensors file '{path}'{detail}: {e}") from None


@dataclass
class StateDictSource:
    """Tensors already in memory under checkpoint names, read like a checkpoint (no copy when dtype/device match)."""

    tensors: dict[str, torch.Tensor]
    directory: str = "<in-memory state dict>"

    def names(self) -> list[str]:
        return list(self.tensors)

    def nbytes(self, name: str) -> int:
        t = self.tensors[name]
        return t.numel() * t.element_size()

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _expected_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (what a checkpoint must provide)."""
    return dict(module.state_dict(keep_vars=True))


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        owner._buffers[leaf] = value


def materialize_buffers(module: nn.Module, device: torch.device | str) -> None:
    """Recompute the derived (non-checkpoint) buffers of modules built on the meta device."""
    for m in module.modules():
        init = getattr(m, "init_buffers", None)
        if callable(init):
            init(device)


def load_weights(
    module: nn.Module,
    checkpoint: Checkpoint | StateDictSource,
    prefixes: Iterable[str],
    weight_map: WeightMap,
    dtype_for: Callable[[str], torch.dtype],
    device: torch.device | str,
    tied: dict[str, str] | None = None,
    progress: bool | None = None,
) -> None:
    """Fill ``module`` (on meta) from ``checkpoint``, reading only names under ``prefixes``.

    ``tied`` maps a module name to the module name it shares storage with, used when the checkpoint
    omits it. Raises ``CheckpointError`` listing missing and unexpected names.
    """
    prefixes = tuple(prefixes)
    expected = _expected_tensors(module)
    by_module_name: dict[str, str] = {}
    stacked: dict[str, dict[tuple[int, int], str]] = {}  # module name -> (index, part) -> checkpoint name
    parts_of: dict[str, int] = {}
    unexpected = []
    for name in checkpoint.names():
        if not name.startswith(prefixes) or weight_map.ignored(name):
            continue
        hit = weight_map.stack_target(name)
        if hit is not None:
            target, index, part, parts = hit
            if target in expected and index < expected[target].shape[0]:
                stacked.setdefault(target, {})[(index, part)] = name
                parts_of[target] = parts
            else:
                unexpected.append(name)
            continue
        target = weight_map.to_module(name)
        if target in expected:
            by_module_name[target] = name
        else:
            unexpected.append(name)
    tied = tied or {}
    missing = [n for n in expected if n not in by_module_name and n not in stacked and n not in tied]
    for target, pieces in stacked.items():
        want = expected[target].shape[0] * parts_of[target]
        if len(pieces) != want:
            missing.append(f"{target} ({len(pieces)} of {want} per-expert slices)")
    if missing or unexpected:
        lines = [f"checkpoint '{checkpoint.directory}' does not match the model built from its config.json:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(sorted(missing)[:40]) + (" ..." if len(missing) > 40 else ""))
        if unexpected:
            lines.append(
                f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:40]) + (" ..." if len(unexpected) > 40 else "")
            )
        raise CheckpointError("\n".join(lines))

    total = sum(checkpoint.nbytes(n) for n in by_module_name.values())
    total += sum(checkpoint.nbytes(n) for pieces in stacked.values() for n in pieces.values())
    show = progress if progress is not None else total > 512 * 2**20
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights")
    for target, name in by_module_name.items():
        t = checkpoint.tensor(name)
        if tuple(t.shape) != tuple(expected[target].shape):
            raise CheckpointError(
                f"tensor '{name}' has shape {tuple(t.shape)} in the checkpoint, the model expects {tuple(expected[target].shape)}"
            )
        if t.is_floating_point():
            t = t.to(dtype_for(target))
        _assign(module, target, t.to(device))
        if bar is not None:
            bar.update(checkpoint.nbytes(name))
    for target, pieces in stacked.items():
        shape = tuple(expected[target].shape)
        rows = shape[1] // parts_of[target]
        want = expected[target]
        # Packed 4-bit experts (thinktalk.quantized) stack int32 tensors: those keep their integer dtype.
        buf = torch.empty(shape, dtype=dtype_for(target) if want.is_floating_point() else want.dtype, device=device)
        for (index, part), name in pieces.items():
            t = checkpoint.tensor(name)
            if tuple(t.shape) != (rows, *shape[2:]):
                raise CheckpointError(
                    f"tensor '{name}' has shape {tuple(t.shape)} in the checkpoint, the model expects {(rows, *shape[2:])}"
                )
            buf[index, part * rows : (part + 1) * rows].copy_(t)
            if bar is not None:
                bar.update(checkpoint.nbytes(name))
        _assign(module, target, buf)
    if bar is not None:
        bar.close()
    for target, source in tied.items():
        if target not in by_module_name:
            src = module.get_parameter(source)
            _assign(module, target, src.data)
    materialize_buffers(module, device)
    left = [n for n, p in module.named_parameters() if p.is_meta] + [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"tensors still unset after loading: {', '.join(left[:20])}")


def save_weights(
    module: nn.Module,
    directory: str | os.PathLike,
    weight_map: WeightMap,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Write ``module``'s parameters under checkpoint names; shard with an index past ``max_shard_bytes``."""
    state = {}
    seen: dict[int, str] = {}
    for name, t in module.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen and t.numel() > 0:
            # Tied weights: store once (like the reference), the loader re-ties them.
            continue
        seen[ptr] = name
        for key, piece in weight_map.checkpoint_tensors(name, t):
            state[key] = piece.detach().contiguous().cpu()
    return save_tensors(state, directory, max_shard_bytes)


def save_tensors(state: dict[str, torch.Tensor], directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write tensors that already carry checkpoint names: ``model.safetensors``, or shards + index."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_index = {}
    for file, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, file), metadata=meta)
        weight_index.update({k: file for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_index}, fh, indent=2)
    return names
