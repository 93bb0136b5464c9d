"""Tensor and expert parallelism of the Thinker's LLM over the ranks of a ``torch.distributed`` group.

Megatron-style sharding with plain modules and one all-reduce per block, so the forward code of
:mod:`thinktalk.nn.decoder` is unchanged:

* attention by heads: ``q/k/v_proj`` keep the rows of this rank's heads (column parallel), ``o_proj``
  the matching input columns (:class:`RowParallelLinear`: partial products summed over the ranks);
  each rank's KV cache holds only its own key/value heads;
* the dense SwiGLU by intermediate columns: ``gate/up_proj`` column parallel, ``down_proj`` row parallel;
* Qwen3's experts spread over the ranks (expert parallel, :class:`ExpertParallelExperts`): the router
  runs everywhere (its weight is replicated), each rank applies only the experts it owns to the token
  copies routed to them, and the partial outputs are summed;
* token table, norms, ``lm_head``, encoders, Talker and vocoder stay whole: on rank 0 only when it
  drives workers it started (:class:`Driver`; the workers hold just their decoder shard), on every rank
  under torchrun.

Every rank runs the same program on the same inputs (SPMD, as under ``torchrun``); the all-reduce
gives every rank the same activations, so greedy decoding agrees everywhere. Loading reads only
this rank's slices of the sharded tensors (safetensors ``get_slice``) and only its own experts.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from thinktalk.checkpoint import Checkpoint, WeightMap
from thinktalk.nn.decoder import Decoder
from thinktalk.nn.mlp import GatedMLP
from thinktalk.nn.moe import Experts, SparseMoE
from thinktalk.nn.quant import QuantConfig, QuantExperts, QuantLinear


class ParallelError(ValueError):
    """A model or a process group that cannot be sharded as asked (named in the message)."""


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group."""

    rank: int
    size: int
    group: object = None  # a torch.distributed ProcessGroup; None: the default (world) group

    @classmethod
    def current(cls, size: int) -> TPGroup:
        """The tensor-parallel group of the running ``torch.distributed`` job (the whole world, of ``size`` ranks)."""
        if size == 1:
            return cls(0, 1)
        if not dist.is_available() or not dist.is_initialized():
            raise ParallelError(
                f"tensor_parallel_size={size} needs torch.distributed initialised in each of {size} processes "
                "(run under torchrun, or start them with thinktalk.parallel.launch)"
            )
        if dist.get_world_size() != size:
            raise ParallelError(f"tensor_parallel_size={size} but the process group has {dist.get_world_size()} ranks")
        return cls(dist.get_rank(), size)


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size > 1:
        dist.all_reduce(x, group=tp.group)
    return x


class RowParallelLinear(nn.Linear):
    """A linear layer whose inputs are split over the ranks: each computes a partial product, summed
    by an all-reduce; the bias (held whole by every rank) is added once, after the sum."""

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__(in_local, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


def _expert_parallel(
    module, base_forward, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """Apply this rank's experts ``[module.first, module.first + module.num_experts)`` to the token copies
    routed to them; the other ranks add theirs in the all-reduce."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    local = ((flat >= module.first) & (flat < module.first + module.num_experts)).nonzero()[:, 0]
    out = x.new_zeros(n, x.shape[-1])
    if local.numel():
        token = local // k
        y = base_forward(x[token], weights.reshape(-1)[local, None], (flat[local] - module.first)[:, None])
        out.index_add_(0, token, y)
    return all_reduce(out, module.tp)


class ExpertParallelExperts(Experts):
    """This rank's experts ``[first, first + count)`` of E; token copies routed elsewhere are skipped."""

    def __init__(self, num_experts: int, first: int, count: int, dim: int, hidden: int, act: str, tp: TPGroup):
        super().__init__(count, dim, hidden, act)
        self.total_experts, self.first, self.tp = num_experts, first, tp

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return _expert_parallel(self, super().forward, x, weights, experts)


class ExpertParallelQuantExperts(QuantExperts):
    """The same for packed 4-bit experts."""

    def __init__(self, num_experts: int, first: int, count: int, dim: int, hidden: int, act: str, cfg: QuantConfig, tp):
        super().__init__(count, dim, hidden, act, cfg)
        self.total_experts, self.first, self.tp = num_experts, first, tp

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return _expert_parallel(self, super().forward, x, weights, experts)


class RowParallelQuantLinear(QuantLinear):
    """:class:`RowParallelLinear` for packed 4-bit weights: this rank's input rows and their groups."""

    def __init__(self, in_local: int, out_features: int, bias: bool, cfg: QuantConfig, tp: TPGroup, group_offset: int):
        super().__init__(in_local, out_features, bias, cfg)
        self.tp, self.group_offset = tp, group_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.matmul(x), self.tp)
        return y if self.bias is None else y + self.bias.to(x.dtype)


@dataclass
class ShardPlan:
    """What each sharded module tensor holds of the checkpoint's, for loading."""

    # module tensor name -> (dim, start, stop) of the checkpoint tensor
    slices: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # stacked experts module prefix ("thinker.model.layers.0.mlp.experts") -> (first, count)
    experts: dict[str, tuple[int, int]] = field(default_factory=dict)


def _split(total: int, tp: TPGroup, what: str) -> tuple[int, int]:
    if total % tp.size:
        raise ParallelError(f"{what}={total} is not divisible by tensor_parallel_size={tp.size}")
    n = total // tp.size
    return tp.rank * n, n


def _column(layer: nn.Module, name: str, start: int, stop: int, plan: ShardPlan) -> nn.Module:
    """Output rows ``[start, stop)`` of a linear layer (float or packed 4-bit)."""
    bias = layer.bias is not None
    n = stop - start
    with torch.device("meta"):
        if isinstance(layer, QuantLinear):
            if start % 8 or stop % 8:
                raise ParallelError(f"{name}: a 4-bit shard must start and end on a multiple of 8 outputs")
            new = QuantLinear(layer.in_features, n, bias, layer.config)
            words = (start, stop) if layer.method == "gptq" else (start // 8, stop // 8)
            plan.slices[f"{name}.qweight"] = (1, *words)
            plan.slices[f"{name}.qzeros"] = (1, start // 8, stop // 8)
            plan.slices[f"{name}.scales"] = (1, start, stop)
        else:
            new = nn.Linear(layer.in_features, n, bias=bias)
            plan.slices[f"{name}.weight"] = (0, start, stop)
    if bias:
        plan.slices[f"{name}.bias"] = (0, start, stop)
    return new


def _row(layer: nn.Module, name: str, start: int, stop: int, tp: TPGroup, plan: ShardPlan) -> nn.Module:
    """Input columns ``[start, stop)`` of a linear layer, its outputs summed over the ranks."""
    bias = layer.bias is not None
    n = stop - start
    with torch.device("meta"):
        if isinstance(layer, QuantLinear):
            cfg = layer.config
            g = cfg.group_size
            if start % g or stop % g:
                raise ParallelError(
                    f"{name}: {n} inputs per rank is not a whole number of 4-bit groups of {g}; use fewer ranks"
                )
            new = RowParallelQuantLinear(n, layer.out_features, bias, cfg, tp, group_offset=start // g)
            words = (start // 8, stop // 8) if layer.method == "gptq" else (start, stop)
            plan.slices[f"{name}.qweight"] = (0, *words)
            plan.slices[f"{name}.qzeros"] = (0, start // g, stop // g)
            plan.slices[f"{name}.scales"] = (0, start // g, stop // g)
            if layer.g_idx is not None:
                plan.slices[f"{name}.g_idx"] = (0, start, stop)
        else:
            new = RowParallelLinear(n, layer.out_features, bias, tp)
            plan.slices[f"{name}.weight"] = (1, start, stop)
    return new


def shard_decoder(decoder: Decoder, prefix: str, tp: TPGroup, plan: ShardPlan) -> None:
    """Replace ``decoder``'s layers' projections (built on meta) by this rank's shards; record them in ``plan``."""
    s = decoder.spec
    h0, heads = _split(s.num_attention_heads, tp, "num_attention_heads")
    kv0, kv = _split(s.num_key_value_heads, tp, "num_key_value_heads")
    d = s.head_dim
    for i, layer in enumerate(decoder.layers):
        p = f"{prefix}layers.{i}."
        attn = layer.self_attn
        attn.q_proj = _column(attn.q_proj, f"{p}self_attn.q_proj", h0 * d, (h0 + heads) * d, plan)
        attn.k_proj = _column(attn.k_proj, f"{p}self_attn.k_proj", kv0 * d, (kv0 + kv) * d, plan)
        attn.v_proj = _column(attn.v_proj, f"{p}self_attn.v_proj", kv0 * d, (kv0 + kv) * d, plan)
        attn.o_proj = _row(attn.o_proj, f"{p}self_attn.o_proj", h0 * d, (h0 + heads) * d, tp, plan)
        attn.heads, attn.kv_heads = heads, kv
        mlp = layer.mlp
        if isinstance(mlp, GatedMLP):
            c0, c = _split(mlp.gate_proj.out_features, tp, "intermediate_size")
            mlp.gate_proj = _column(mlp.gate_proj, f"{p}mlp.gate_proj", c0, c0 + c, plan)
            mlp.up_proj = _column(mlp.up_proj, f"{p}mlp.up_proj", c0, c0 + c, plan)
            mlp.down_proj = _row(mlp.down_proj, f"{p}mlp.down_proj", c0, c0 + c, tp, plan)
        elif isinstance(mlp, SparseMoE):
            if mlp.shared_expert is not None:
                raise ParallelError(
                    f"{p}mlp has a shared expert; expert parallelism covers the Thinker's routed experts only"
                )
            e = mlp.experts
            first, count = _split(e.num_experts, tp, "num_experts")
            with torch.device("meta"):
                if isinstance(e, QuantExperts):
                    new = ExpertParallelQuantExperts(
                        e.num_experts, first, count, e.dim, e.hidden, e.act_name, e.config, tp
                    )
                else:
                    new = ExpertParallelExperts(e.num_experts, first, count, s.hidden_size, e.hidden, e.act_name, tp)
            new.impl = e.impl
            mlp.experts = new
            plan.experts[f"{p}mlp.experts"] = (first, count)
        else:
            raise ParallelError(f"{p}mlp is a {type(mlp).__name__}, which cannot be sharded")
    decoder.spec = replace(s, num_attention_heads=heads, num_key_value_heads=kv)


def check_shards(model: nn.Module) -> None:
    """After loading: a row shard of an act-order GPTQ layer must not need another rank's groups."""
    for name, m in model.named_modules():
        if isinstance(m, RowParallelQuantLinear) and m.g_idx is not None:
            local = m.local_g_idx()
            if int(local.min()) < 0 or int(local.max()) >= m.scales.shape[0]:
                raise ParallelError(
                    f"{name}: this act-order (desc_act) GPTQ layer mixes groups across the input rows, so it cannot be "
                    "split over ranks; load it without tensor parallelism"
                )


def shard_model(model: nn.Module, tp: TPGroup) -> ShardPlan:
    """Shard the Thinker's LLM of a meta-built model in place; the rest stays whole on every rank."""
    plan = ShardPlan()
    thinker = getattr(model, "thinker", None)
    if thinker is None:
        raise ParallelError("tensor parallelism shards the Thinker; this model was built without one")
    shard_decoder(thinker.model, "thinker.model.", tp, plan)
    model.tensor_parallel = tp
    return plan


_EXPERT_INDEX = re.compile(r"^(?P<head>.+\.mlp\.experts)\.(?P<index>\d+)\.(?P<tail>.+)$")


@dataclass
class ShardedSource:
    """A checkpoint as one rank sees it: sharded tensors cut to its slice, only its experts (renumbered from 0)."""

    base: object
    plan: ShardPlan
    weight_map: WeightMap
    _local: dict[str, str] = field(default_factory=dict, repr=False)  # this rank's expert name -> checkpoint name
    _skipped: set[str] = field(default_factory=set, repr=False)  # the checkpoint names of other ranks' experts

    def __post_init__(self):
        for name in self.base.names():
            m = _EXPERT_INDEX.match(name)
            if m and m["head"] in self.plan.experts:
                first, count = self.plan.experts[m["head"]]
                i = int(m["index"])
                if first <= i < first + count:
                    self._local[f"{m['head']}.{i - first}.{m['tail']}"] = name
                self._skipped.add(name)

    @property
    def directory(self) -> str:
        return self.base.directory

    def names(self) -> list[str]:
        return [n for n in self.base.names() if n not in self._skipped] + list(self._local)

    def _slice(self, name: str):
        return self.plan.slices.get(self.weight_map.to_module(name))

    def nbytes(self, name: str) -> int:
        name = self._local.get(name, name)
        sl = self._slice(name)
        full = self.base.nbytes(name)
        if sl is None:
            return full
        return full * (sl[2] - sl[1]) // self.base_shape(name)[sl[0]]

    def base_shape(self, name: str) -> tuple[int, ...]:
        if isinstance(self.base, Checkpoint):
            return self.base.shape(name)
        return tuple(self.base.tensor(name).shape)

    def tensor(self, name: str) -> torch.Tensor:
        name = self._local.get(name, name)
        sl = self._slice(name)
        if sl is None:
            return self.base.tensor(name)
        dim, start, stop = sl
        if isinstance(self.base, Checkpoint):
            return self.base.tensor_slice(name, dim, start, stop)
        return self.base.tensor(name).narrow(dim, start, stop - start).contiguous()


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``, as torchrun sets it)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0)))
    return device


def launch(fn, size: int, *args, backend: str | None = None, port: int | None = None, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` in ``size`` new processes joined in one process group (gloo on CPU, NCCL with GPUs).

    For scripts and tests without torchrun; ``fn`` must be importable (a module-level function).
    """
    import socket

    import torch.multiprocessing as mp

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= size else "gloo")
    mp.spawn(_worker, args=(size, port, backend, timeout_s, fn, args), nprocs=size, join=True)


def _worker(rank, size, port, backend, timeout_s, fn, args):
    from datetime import timedelta

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank)
    )
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


# -- one process drives, the others follow (thinktalk.load(..., tensor_parallel_size=N) without torchrun) --------
_DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


def _cpu(x):
    """Tensors (also inside lists/tuples) on the CPU, to be pickled for the other ranks."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


class Driver:
    """Rank 0 of a group that :func:`start_workers` started: the Thinker's LLM calls, mirrored to the workers.

    Only the decoder is sharded, so only its calls are sent: before each forward, its inputs and the
    fill levels of the KV cache view it writes (the engine moves those on its own: prefix reuse, resets);
    the workers run their shard of the same layers on them, meeting rank 0 in each all-reduce. Their
    caches mirror rank 0's pools (same rows and slots, their own key/value heads). Calls are serialised
    by a lock, so the collectives of two threads never interleave.
    """

    def __init__(self, tp: TPGroup, processes: list):
        import itertools
        import threading

        self.tp, self.processes = tp, processes
        self.lock = threading.Lock()
        self._pool_ids = itertools.count()
        self.closed = False

    def dead_ranks(self) -> list[int]:
        """Worker ranks whose process has exited (the group cannot run the model any more)."""
        return [i + 1 for i, p in enumerate(self.processes) if not p.is_alive()]

    def _send(self, command) -> None:
        dist.broadcast_object_list([command], src=0)

    def new_cache(self, cache, batch: int, max_len: int, dtype: torch.dtype) -> None:
        with self.lock:
            cache.pool = next(self._pool_ids)
            self._send(("new_cache", cache.pool, batch, max_len, str(dtype)))

    def forward(self, decoder: Decoder, args: dict):
        cache = args["cache"]
        if cache is not None and cache.pool is None:
            raise ParallelError("a tensor-parallel decoder needs caches from its own new_cache()")
        with self.lock:
            meta = None
            if cache is not None:
                meta = dict(pool=cache.pool, row0=cache.row0, lengths=_cpu(cache.lengths), valid=_cpu(cache.valid),
                            host_lengths=cache.host_lengths.copy(), host_holes=cache.host_holes.copy(), full=cache.full)  # fmt: skip
            payload = {k: _cpu(v) for k, v in args.items() if k != "cache"}
            payload["active"] = None if args["active"] is None else list(args["active"])
            self._send(("forward", payload, meta))
            return decoder.run(**args)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.lock:
            try:
                self._send(("stop",))
            finally:
                for p in self.processes:
                    p.join(30)
                dist.destroy_process_group()


def _follow(decoder: Decoder, device: torch.device) -> None:
    """A worker's loop: run the commands rank 0's :class:`Driver` sends, until it says stop."""
    from thinktalk.nn.cache import KVCache  # noqa: F401 (the pools below)

    pools = {}
    torch.set_grad_enabled(False)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        command = box[0]
        if command[0] == "stop":
            return
        if command[0] == "new_cache":
            _, pool, batch, max_len, dtype = command
            pools[pool] = decoder.new_cache(batch, max_len, _DTYPES[dtype])
            continue
        _, payload, meta = command
        args = {k: _to(v, device) for k, v in payload.items()}
        cache = None
        if meta is not None:
            rows = meta["lengths"].shape[0]
            cache = pools[meta["pool"]].rows(meta["row0"], meta["row0"] + rows)
            cache.lengths.copy_(meta["lengths"])
            cache.valid.copy_(meta["valid"])
            cache.host_lengths[:] = meta["host_lengths"]
            cache.host_holes[:] = meta["host_holes"]
            cache.full = meta["full"]
        try:
            decoder.run(cache=cache, **args)
        except Exception as e:  # noqa: BLE001
            # The same inputs raise the same error on rank 0 (e.g. a KV cache overflow, checked before any
            # all-reduce), where the engine reports it; this rank stays in step for the next command.
            logging.getLogger("thinktalk.parallel").warning("rank %d: decoder call failed: %s", dist.get_rank(), e)


def load_decoder_shard(
    directory: str, device: torch.device, dtype, tp: TPGroup, dequantize: bool = False, quant_kernel: str = "plain"
) -> tuple[Decoder, torch.device]:
    """A worker's part of the model: its shard of the Thinker's decoder layers and final norm, nothing else.

    The worker only runs the layers on the hidden states rank 0 sends, so the token table, ``lm_head``,
    the encoders, the Talker and the vocoder are neither built nor read.
    """
    from thinktalk.checkpoint import load_weights
    from thinktalk.config import read_config
    from thinktalk.loading import build, default_dtype
    from thinktalk.nn.quant import find_quant_config
    from thinktalk.quantized import prepare_quantized, quantized_dtype_for, use_int4mm

    data = read_config(directory)
    quant = find_quant_config(data)
    model = build(data, ("thinker",))
    thinker = model.thinker
    for name in ("audio_tower", "visual", "lm_head"):
        if hasattr(thinker, name):
            delattr(thinker, name)
    decoder = thinker.model
    if decoder.spec.vocab_size:
        delattr(decoder, decoder.embed_name)
    source, weight_map = Checkpoint.open(directory), model.weight_map
    if quant is not None:
        source, weight_map = prepare_quantized(model, source, weight_map, quant, dequantize_all=dequantize)
    source = ShardedSource(source, shard_model(model, tp), weight_map)
    device = device_for_rank(device)
    dtype = dtype or default_dtype(device)
    dtype_for = lambda name: model.dtype_for(name, dtype)  # noqa: E731
    if quant is not None and not dequantize:
        dtype_for = quantized_dtype_for(dtype_for, dtype)
    load_weights(model, source, prefixes=("thinker.model.layers.", "thinker.model.norm."), weight_map=weight_map,
                 dtype_for=dtype_for, device=device, tied={}, progress=False)  # fmt: skip
    model.eval()
    check_shards(model)
    if quant is not None and not dequantize and quant_kernel == "int4mm":
        use_int4mm(model)
    return decoder, device


def _tp_worker(
    rank: int, size: int, port: int, backend: str, directory: str, device: str, dtype, options: dict, parent: int
) -> None:
    import threading
    import time
    from datetime import timedelta

    def watch_parent():  # a driver killed without close() must not leave its workers waiting forever
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    os.environ.update(LOCAL_RANK=str(rank))
    if backend == "nccl":
        # NCCL's object collectives (the Driver's broadcasts) use the current device: one GPU per rank.
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=RENDEZVOUS_S))
    # An idle server sends nothing for hours: the collectives must not time out.
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(days=7))
    decoder, device = load_decoder_shard(directory, torch.device(device), dtype, TPGroup.current(size), **options)
    try:
        _follow(decoder, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


RENDEZVOUS_S = 120  # how long rank 0 waits for its workers to start and join


def start_workers(
    directory: str, size: int, device: torch.device, dtype, options: dict | None = None
) -> tuple[TPGroup, list]:
    """Start ranks 1..size-1 (new processes loading their shards of ``directory``) and join them as rank 0."""
    import socket
    from datetime import timedelta

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ParallelError(f"tensor_parallel_size={size} needs {size} GPUs; {torch.cuda.device_count()} are visible")
    if backend == "nccl":
        torch.cuda.set_device(device.index or 0)
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, size):
        p = ctx.Process(target=_tp_worker, args=(rank, size, port, backend, directory, str(device), dtype, options or {}, os.getpid()),
                        daemon=True, name=f"thinktalk-tp{rank}")  # fmt: skip
        p.start()
        procs.append(p)
    try:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=True, timeout=timedelta(seconds=RENDEZVOUS_S))
        dist.init_process_group(backend, store=store, rank=0, world_size=size, timeout=timedelta(days=7))
    except Exception as e:
        dead = [f"rank {i + 1} exited with code {p.exitcode}" for i, p in enumerate(procs) if not p.is_alive()]
        for p in procs:
            p.kill()
        raise ParallelError(
            f"the tensor-parallel workers did not join ({'; '.join(dead) or e}); a script that loads with "
            "tensor_parallel_size > 1 must guard its entry point with `if __name__ == '__main__':`"
        ) from None
    return TPGroup(0, size), procs
