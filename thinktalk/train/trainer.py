"""The trainer: one loop for every recipe.

Per optimizer step: take the step's global batch from the :class:`~thinktalk.train.data.BatchPlan`,
cut this process's micro-batches, let the recipe prepare them (rollouts, teacher scores), count the
loss units over the whole global batch, then forward + backward each micro-batch with its summed loss
divided by that count — so one process with batch 4 and two processes with batch 2 compute the same
update. AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on GPUs, activation
checkpointing, FSDP2 with several processes, resumable checkpoints, and the final model in the
official checkpoint layout.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from thinktalk.train import checkpointing, distributed
from thinktalk.train.config import LoadedConfig, TrainConfig, to_yaml
from thinktalk.train.data import BatchPlan, build_dataset, collate, micro_batches
from thinktalk.train.metrics import MetricsLog, progress_bar
from thinktalk.train.recipes import recipe_class
from thinktalk.train.recipes.base import Recipe, RecipeContext, StepInfo


@dataclass
class TrainResult:
    output_dir: str
    records: list[dict] = field(default_factory=list)  # the metrics of the steps this run computed
    final_dir: str | None = None
    start_step: int = 0

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]


class TrainModules(nn.Module):
    """The trained components under the model's attribute names (so state-dict keys are checkpoint
    names); its forward is the recipe's loss, the one entry point FSDP2's root unit needs."""

    def __init__(self, model: nn.Module, components: tuple[str, ...], recipe: Recipe):
        super().__init__()
        for name in components:
            self.add_module(name, getattr(model, name))
        self.__dict__["recipe"] = recipe  # not a sub-module
        self.touch: list[str] = []  # parameter names, resolved at forward time (FSDP2 swaps the objects)
        self.metrics: dict[str, tuple[float, float]] = {}

    def forward(self, batch) -> torch.Tensor:
        out = self.recipe.loss(self, batch)
        loss = out.loss
        if self.touch:
            # Under FSDP2 every process must reduce the same gradients: parameters its micro-batch
            # did not use (an encoder without media) get an explicit zero gradient.
            loss = loss + sum(self.get_parameter(n).sum() for n in self.touch) * 0.0
        self.metrics = out.metrics
        return loss


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(params: dict[str, nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def train(loaded: LoadedConfig) -> TrainResult:
    """Run the recipe of ``loaded`` to ``max_steps``; see the module docstring."""
    import thinktalk
    from thinktalk.loading import resolve_path

    cfg = loaded.train
    dist_info, device = distributed.init(cfg.device)
    try:
        result = _train(loaded, cfg, dist_info, device, thinktalk, resolve_path)
        distributed.finish(dist_info)
        return result
    finally:
        distributed.shutdown(dist_info)


def _train(loaded, cfg, dist_info, device, thinktalk, resolve_path) -> TrainResult:
    cls = recipe_class(cfg.recipe)
    torch.manual_seed(cfg.seed)
    base_dir = resolve_path(cfg.model)
    model = thinktalk.load(base_dir, device=device, dtype=_dtype(cfg.dtype), components=cls.load_components)
    model.train()
    processor = thinktalk.Processor.from_pretrained(base_dir)
    use_autocast = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and device.type == "cuda")
    ctx = RecipeContext(cfg=cfg, options=loaded.options, model=model, processor=processor, device=device,
                        rank=dist_info.rank, world=dist_info.world)
    recipe = cls(ctx)
    recipe.setup()
    params = recipe.select_parameters()
    if not params:
        raise ValueError(f"recipe '{cfg.recipe}' selected no parameters to train")
    modules = TrainModules(model, cls.components, recipe)
    if cfg.gradient_checkpointing:
        distributed.apply_activation_checkpointing(modules)
    if dist_info.enabled:
        layer_params = {id(p) for layer in distributed.decoder_layers(modules) for p in layer.parameters()}
        modules.touch = [n for n, p in modules.named_parameters() if p.requires_grad and id(p) not in layer_params]
        distributed.shard(modules)
        params = {n: p for n, p in modules.named_parameters() if p.requires_grad}
    ctx.generation = lambda: distributed.full_weights(modules)
    trainable = set(params)

    # -- data ------------------------------------------------------------------------------------------
    dataset = build_dataset(cfg.data_paths, recipe.encode, cfg.skip_bad_rows, progress=cfg.progress and dist_info.main)
    recipe.on_dataset(dataset)
    items = cfg.batch_size * cfg.grad_accum * dist_info.world
    plan = BatchPlan(
        dataset.sources, [d.weight for d in cfg.data], dataset.lengths(), items, cfg.seed, cfg.length_bucketing,
        cfg.bucket_batches, cfg.packing, cfg.max_length,
    )
    pad_id = processor.tokenizer.pad_token_id

    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    # -- resume ----------------------------------------------------------------------------------------
    start = 0
    resume_from = None
    if cfg.resume == "auto":
        found = checkpointing.list_checkpoints(cfg.output_dir)
        resume_from = found[-1][1] if found else None
    elif cfg.resume != "never":
        resume_from = cfg.resume
    if resume_from is not None:
        state, recipe_state = checkpointing.load_resumable(resume_from, modules, optimizer, trainable, dist_info.rank)
        scheduler.load_state_dict(torch.load(os.path.join(resume_from, "scheduler.pt"), weights_only=True))
        recipe.load_state_dict(recipe_state)
        start = int(state["step"])
        if dist_info.main:
            done = " — already at max_steps, nothing to train" if start >= cfg.max_steps else ""
            print(f"resuming from {resume_from} (step {start}){done}", flush=True)

    log = MetricsLog(cfg.output_dir, cfg.tensorboard, resume_step=start, enabled=dist_info.main)
    if dist_info.main:
        with open(os.path.join(cfg.output_dir, "train_config.yaml"), "w", encoding="utf-8") as fh:
            fh.write(to_yaml(loaded.raw))
        if dataset.bad_rows:
            print(f"skipped {dataset.bad_rows} bad row(s); the first: {dataset.errors[0]}", flush=True)
    bar = progress_bar(cfg.max_steps, start, cfg.progress and dist_info.main)
    result = TrainResult(cfg.output_dir, start_step=start)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext

    batches = iter(plan)
    current, current_index = None, -1
    repeat = max(1, recipe.repeat_batches)
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        index = (step - 1) // repeat
        while current_index < index:
            current, current_index = next(batches), current_index + 1
        mine = micro_batches(current, cfg.batch_size, cfg.grad_accum, dist_info.rank, dist_info.world)
        prepared = []
        for a, ids in enumerate(mine):
            batch = collate([[dataset.examples[i] for i in item] for item in ids], pad_id, cfg.packing).to(device)
            with torch.no_grad(), autocast():
                prepared.append(recipe.prepare(batch, StepInfo(step=step, micro=a, repeat=(step - 1) % repeat)))
        local_count = sum(recipe.count(b) for b in prepared)
        (total,) = distributed.all_reduce_sum([local_count], device)
        scale = dist_info.world / max(total, 1e-12)
        loss_sum = 0.0
        metric_sums: dict[str, list[float]] = {}
        for batch in prepared:
            with autocast():
                loss = modules(batch)
            (loss * scale).backward()
            loss_sum += float(loss.detach())
            for k, (v, w) in modules.metrics.items():
                acc = metric_sums.setdefault(k, [0.0, 0.0])
                acc[0] += v
                acc[1] += w
        grad_norm = _clip(list(params.values()), cfg.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        keys = sorted(metric_sums)
        reduced = distributed.all_reduce_sum([loss_sum] + [x for k in keys for x in metric_sums[k]], device)
        record = {"step": step, "loss": reduced[0] / max(total, 1e-12), "lr": lr, "grad_norm": grad_norm}
        for j, k in enumerate(keys):
            s, w = reduced[1 + 2 * j], reduced[2 + 2 * j]
            record[k] = s / w if w > 0 else s
        record["skipped_rows"] = dataset.bad_rows
        record["seconds"] = time.perf_counter() - t0
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {record['loss']} (lower lr, check the data)")
        result.records.append(record)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
            _save(cfg, step, modules, optimizer, scheduler, trainable, recipe, dist_info, loaded)
    if bar is not None:
        bar.close()
    log.close()

    if cfg.save_final:
        state = checkpointing.full_state(modules)
        if dist_info.main:
            recipe.write_extras(cfg.output_dir, state)
            checkpointing.write_model(cfg.output_dir, base_dir, model, recipe.final_state(state), cls.components)
            recipe.after_export(cfg.output_dir)
            result.final_dir = cfg.output_dir
        if dist_info.enabled:
            torch.distributed.barrier()
    return result


def _clip(params: list[nn.Parameter], max_norm: float) -> float:
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _save(cfg, step, modules, optimizer, scheduler, trainable, recipe, dist_info, loaded) -> None:
    path = checkpointing.checkpoint_dir(cfg.output_dir, step)
    state = {"step": step, "world_size": dist_info.world, "recipe": cfg.recipe, "model": cfg.model, "config": loaded.raw}
    if dist_info.main:
        os.makedirs(path, exist_ok=True)
        torch.save(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
    checkpointing.save_resumable(path, modules, optimizer, trainable, state, recipe.state_dict(), dist_info.rank)
    if dist_info.main:
        checkpointing.prune(cfg.output_dir, cfg.save_total_limit)
