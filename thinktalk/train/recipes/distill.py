"""Strong-to-weak distillation (Qwen3 / Qwen3-Omni post-training): a large teacher's distributions
teach a small student that shares its tokenizer.

* **off-policy** (the default): on the data's own assistant turns, the student matches the
  teacher's top-k next-token distribution at every answer token (forward KL over the teacher's k
  most likely tokens, renormalised). The teacher's top-k comes from a file (``teacher_logits``;
  written from the teacher on the first run when it does not exist yet) or is computed live each step.
* **on-policy** (``on_policy: true``): the student samples answers to the prompts with thinktalk's own
  generation, the teacher scores every sampled position, and the student minimises the reverse KL
  KL(p_student ‖ p_teacher) over the full vocabulary (mode-seeking: it is pushed away from what the
  teacher finds unlikely, on the sequences it actually produces).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from thinktalk.train import forward, rollout
from thinktalk.train.data import Batch, Dataset, Example, collate
from thinktalk.train.recipes.base import ChatOptions, ChatRecipe, LossOutput, StepInfo, encode_prompt_row

TOPK_FORMAT = "thinktalk-teacher-topk-1"


@dataclass
class DistillOptions(ChatOptions):
    teacher: str = ""  # teacher checkpoint (same tokenizer); not needed off-policy with a stored file
    on_policy: bool = False  # false: the data's answers; true: the student's own samples
    top_k: int = 16  # off-policy: teacher tokens kept per position
    teacher_logits: str = ""  # off-policy: stored teacher top-k (safetensors); created from the teacher if missing
    ce_weight: float = 0.0  # off-policy: + ce_weight x cross-entropy on the data's answer tokens
    max_new_tokens: int = 128  # on-policy sampling
    temperature: float = 1.0
    top_p: float = 1.0
    sample_top_k: int = 0


def row_key(ex: Example) -> str:
    return f"{os.path.basename(ex.row.path)}:{ex.row.line}"


class Distill(ChatRecipe):
    name = "distill"
    Options = DistillOptions
    default_trainable = ("llm",)

    def setup(self) -> None:
        o = self.options
        if not o.on_policy and o.top_k < 1:
            raise ValueError("distill: top_k must be >= 1")
        self.stored = not o.on_policy and bool(o.teacher_logits) and os.path.exists(o.teacher_logits)
        self.teacher = None
        if not self.stored:
            if not o.teacher:
                raise ValueError("distill: give a teacher checkpoint (or, off-policy, a stored teacher_logits file)")
            import thinktalk

            self.teacher = thinktalk.load(o.teacher, device=self.ctx.device, dtype=self.model.thinker.lm_head.weight.dtype,
                                          components=("thinker",))
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            if self.teacher.thinker.lm_head.out_features != self.model.thinker.lm_head.out_features:
                raise ValueError("distill: the teacher's vocabulary differs from the student's (they must share a tokenizer)")
        if self.cfg.packing and o.on_policy:
            raise ValueError("distill: packing does not apply on-policy (completions are sampled)")
        self.pad_id = self.processor.tokenizer.pad_token_id

    # -- data --------------------------------------------------------------------------------------
    def encode(self, row) -> Example:
        if self.options.on_policy:
            return encode_prompt_row(self, row)
        return super().encode(row)

    def on_dataset(self, dataset: Dataset) -> None:
        """Attach stored teacher top-k to the examples, or compute (and store) them once."""
        o = self.options
        if o.on_policy or not o.teacher_logits:
            return
        if self.stored:
            load_topk(o.teacher_logits, dataset.examples, o.top_k)
            return
        for ex in dataset.examples:
            batch = collate([[ex]], self.pad_id).to(self.ctx.device)
            ids, lps = self._teacher_topk(batch)
            ex.extra["teacher_ids"], ex.extra["teacher_logprobs"] = ids.cpu(), lps.cpu()
        if self.ctx.rank == 0:
            save_topk(o.teacher_logits, dataset.examples, o.top_k, o.teacher)
        self.stored = True

    def _teacher_topk(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            hidden = forward.hidden_states(self.teacher.thinker, batch, self.cfg.use_audio_in_video)
            h, _, _ = forward.targets(hidden, batch.labels)
            return forward.teacher_topk(self.teacher.thinker.lm_head, h, self.options.top_k, self.cfg.loss_chunk_size)

    def prepare(self, batch: Batch, step: StepInfo) -> Batch:
        o = self.options
        if not o.on_policy:
            if self.stored:
                examples = [e for item in batch.items for e in item]
                batch.extra["teacher_ids"] = torch.cat([e.extra["teacher_ids"] for e in examples]).to(self.ctx.device).long()
                batch.extra["teacher_logprobs"] = torch.cat([e.extra["teacher_logprobs"] for e in examples]).to(self.ctx.device)
            else:
                batch.extra["teacher_ids"], batch.extra["teacher_logprobs"] = self._teacher_topk(batch)
            return batch
        prompts = [item[0] for item in batch.items]
        seed = (self.cfg.seed * 1_000_003 + step.step * 1009 + step.micro * 17 + self.ctx.rank * 7919) % (2**63)
        with self.ctx.generation():
            completions = rollout.sample(self.model, prompts, 1, self.pad_id, o.max_new_tokens, o.temperature, o.top_p,
                                         o.sample_top_k, seed, self.ctx.device)
        examples = [rollout.training_example(c, self.positions, self.cfg.use_audio_in_video) for c in completions]
        train = collate([[e] for e in examples], self.pad_id).to(self.ctx.device)
        with torch.no_grad():
            hidden = forward.hidden_states(self.teacher.thinker, train, self.cfg.use_audio_in_video)
            h, _, _ = forward.targets(hidden, train.labels)
            train.extra["teacher_logits"] = self.teacher.thinker.lm_head(h).float()
        train.extra["completion_tokens"] = float(sum(len(c.ids) for c in completions))
        return train

    # -- the loss ----------------------------------------------------------------------------------
    def loss(self, modules, batch: Batch) -> LossOutput:
        o = self.options
        thinker = modules.thinker
        hidden = forward.hidden_states(thinker, batch, self.cfg.use_audio_in_video)
        h, y, _ = forward.targets(hidden, batch.labels)
        chunk = self.cfg.loss_chunk_size
        if o.on_policy:
            kl = forward.reverse_kl_sum(thinker.lm_head, h, batch.extra["teacher_logits"], chunk)
            n = float(y.numel())
            return LossOutput(kl, {"kl": (float(kl.detach()), n), "completion_tokens": (batch.extra["completion_tokens"], float(len(batch.items)))})
        ids, lps = batch.extra["teacher_ids"], batch.extra["teacher_logprobs"]
        if ids.shape[0] != h.shape[0]:
            raise RuntimeError(f"teacher top-k covers {ids.shape[0]} positions, the batch has {h.shape[0]} targets")
        kl = forward.topk_kl_sum(thinker.lm_head, h, ids, lps, chunk)
        loss = kl
        metrics = {"kl": (float(kl.detach()), float(y.numel()))}
        if o.ce_weight:
            ce = forward.cross_entropy_sum(thinker.lm_head, h, y, chunk)
            loss = loss + o.ce_weight * ce
            metrics["ce"] = (float(ce.detach()), float(y.numel()))
        return LossOutput(loss, metrics)


# -- stored teacher top-k -------------------------------------------------------------------------------


def save_topk(path: str, examples: list[Example], k: int, teacher: str) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for ex in examples:
        key = row_key(ex)
        tensors[f"ids/{key}"] = ex.extra["teacher_ids"].to(torch.int32).contiguous()
        tensors[f"logprobs/{key}"] = ex.extra["teacher_logprobs"].float().contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"format": TOPK_FORMAT, "top_k": str(k), "teacher": teacher})


def load_topk(path: str, examples: list[Example], k: int) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TOPK_FORMAT:
            raise ValueError(f"'{path}' is not a thinktalk teacher top-k file")
        if int(meta.get("top_k", -1)) != k:
            raise ValueError(f"'{path}' stores top-{meta.get('top_k')} teacher tokens, the config asks for top_k={k}")
        names = set(f.keys())
        for ex in examples:
            key = row_key(ex)
            if f"ids/{key}" not in names:
                raise ValueError(f"'{path}' has no teacher top-k for {ex.row.where}: create the file again")
            ids, lps = f.get_tensor(f"ids/{key}"), f.get_tensor(f"logprobs/{key}")
            if ids.shape[0] != ex.num_targets:
                raise ValueError(
                    f"'{path}' has {ids.shape[0]} teacher positions for {ex.row.where}, the row has {ex.num_targets}: "
                    "the data or max_length changed; create the file again"
                )
            ex.extra["teacher_ids"], ex.extra["teacher_logprobs"] = ids, lps
