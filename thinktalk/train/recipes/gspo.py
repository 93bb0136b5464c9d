"""GSPO: Group Sequence Policy Optimization (Zheng et al., 2025), the Thinker's last post-training stage.

For every prompt the policy samples a group of G completions (thinktalk's ``model.generate`` with
``do_sample=True``); each gets a reward (rule-based and/or model-based, :mod:`thinktalk.train.rewards`)
and a group-normalised advantage A_i = (r_i - mean(r)) / (std(r) + eps). The importance ratio is
per *sequence*, the geometric mean of the token ratios,

    s_i(θ) = (π_θ(y_i | x) / π_old(y_i | x)) ** (1 / |y_i|) = exp(mean_t [log π_θ(y_i,t) - log π_old(y_i,t)]),

and the loss is the clipped surrogate -mean_i min(s_i A_i, clip(s_i, 1 - ε_low, 1 + ε_high) A_i). The
paper clips far tighter than token-level PPO (ε ≈ 3e-4 / 4e-4). π_old is the policy that sampled the
group: ``updates_per_rollout`` > 1 reuses a rollout for several optimizer steps, where the ratio (and
the clipping) departs from 1; with 1, s_i = 1 and the gradient is A_i ∇ mean_t log π_θ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thinktalk.train import forward, rollout
from thinktalk.train.data import Batch, collate
from thinktalk.train.recipes.base import LossOutput, Recipe, StepInfo, encode_prompt_row
from thinktalk.train.rewards import Rewards, RewardSpec


@dataclass
class GSPOOptions:
    group_size: int = 4  # completions sampled per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    clip_low: float = 3e-4  # ε_low
    clip_high: float = 4e-4  # ε_high
    updates_per_rollout: int = 1
    advantage_eps: float = 1e-6
    rewards: list[RewardSpec] = field(default_factory=list)


class GSPO(Recipe):
    name = "gspo"
    Options = GSPOOptions
    default_trainable = ("llm",)

    def setup(self) -> None:
        o = self.options
        if o.group_size < 2:
            raise ValueError("gspo: group_size must be >= 2 (advantages are normalised within a group)")
        if self.cfg.packing:
            raise ValueError("gspo: packing does not apply (rows are prompts; completions are sampled)")
        self.rewards = Rewards(o.rewards)
        self.repeat_batches = max(1, o.updates_per_rollout)
        self.buffer: dict[int, Batch] = {}
        self.pad_id = self.processor.tokenizer.pad_token_id

    def encode(self, row):
        for key in self.rewards.needs_field():
            if key not in row.data:
                raise row.error(f"the rewards compare with the row's '{key}', which it lacks")
        return encode_prompt_row(self, row)

    def _seed(self, step: StepInfo) -> int:
        return (self.cfg.seed * 1_000_003 + step.step * 1009 + step.micro * 17 + self.ctx.rank * 7919) % (2**63)

    def prepare(self, batch: Batch, step: StepInfo) -> Batch:
        if step.repeat > 0 and step.micro in self.buffer:
            return self.buffer[step.micro]
        o = self.options
        prompts = [item[0] for item in batch.items]
        with self.ctx.generation():
            completions = rollout.sample(
                self.model, prompts, o.group_size, self.pad_id, o.max_new_tokens, o.temperature, o.top_p, o.top_k,
                self._seed(step), self.ctx.device,
            )
        prompt_texts = [self.processor.decode(c.prompt.input_ids, skip_special_tokens=False) for c in completions]
        rewards, parts = self.rewards(prompt_texts, [c.text for c in completions], [c.prompt.row.data for c in completions])
        r = torch.tensor(rewards, dtype=torch.float32).view(-1, o.group_size)
        adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + o.advantage_eps)
        examples = [rollout.training_example(c, self.positions, self.cfg.use_audio_in_video) for c in completions]
        train = collate([[e] for e in examples], self.pad_id).to(self.ctx.device)
        train.extra = {
            "advantages": adv.flatten().to(self.ctx.device),
            "rewards": rewards,
            "parts": parts,
            "lengths": [len(c.ids) for c in completions],
        }
        self.buffer[step.micro] = train
        return train

    def count(self, batch: Batch) -> float:
        return float(batch.labels.shape[0])

    def loss(self, modules, batch: Batch) -> LossOutput:
        o = self.options
        thinker = modules.thinker
        hidden = forward.hidden_states(thinker, batch, self.cfg.use_audio_in_video)
        h, y, rows = forward.targets(hidden, batch.labels)
        lp = forward.token_logprobs(thinker.lm_head, h, y, self.cfg.loss_chunk_size)
        old = batch.extra.get("old_logprobs")
        if old is None:
            old = lp.detach()
            batch.extra["old_logprobs"] = old  # π_old for the later updates on this rollout
        n = batch.labels.shape[0]
        lengths = torch.zeros(n, device=lp.device).index_add_(0, rows, torch.ones_like(lp))
        log_ratio = torch.zeros(n, device=lp.device).index_add_(0, rows, lp - old) / lengths.clamp_min(1)
        ratio = log_ratio.exp()
        adv = batch.extra["advantages"]
        clipped = ratio.clamp(1 - o.clip_low, 1 + o.clip_high)
        loss = -torch.minimum(ratio * adv, clipped * adv).sum()
        rewards = batch.extra["rewards"]
        metrics = {
            "reward": (float(sum(rewards)), float(n)),
            "reward_std": (float(torch.tensor(rewards).view(-1, o.group_size).std(1).sum()), float(n / o.group_size)),
            "clip_frac": (float(((ratio - clipped).abs() > 0).sum()), float(n)),
            "ratio": (float(ratio.detach().sum()), float(n)),
            "completion_tokens": (float(sum(batch.extra["lengths"])), float(n)),
        }
        for name, values in batch.extra["parts"].items():
            metrics[f"reward_{name}"] = (float(sum(values)), float(n))
        return LossOutput(loss, metrics)

    # The rollout buffer is part of a resumable checkpoint (a resume between updates on one rollout
    # continues with the same samples and the same π_old).
    def state_dict(self) -> dict:
        out = {}
        for micro, b in self.buffer.items():
            out[str(micro)] = {
                "inputs": b.inputs, "labels": b.labels, "position_ids": b.position_ids,
                "advantages": b.extra["advantages"], "rewards": b.extra["rewards"], "lengths": b.extra["lengths"],
                "parts": b.extra["parts"], "old_logprobs": b.extra.get("old_logprobs"),
            }
        return {"buffer": out}

    def load_state_dict(self, state: dict) -> None:
        device = self.ctx.device
        self.buffer = {}
        for micro, s in state.get("buffer", {}).items():
            b = Batch({k: v.to(device) for k, v in s["inputs"].items()}, s["labels"].to(device), s["position_ids"].to(device), [])
            b.extra = {"advantages": s["advantages"].to(device), "rewards": s["rewards"], "lengths": s["lengths"], "parts": s["parts"]}
            if s["old_logprobs"] is not None:
                b.extra["old_logprobs"] = s["old_logprobs"].to(device)
            self.buffer[int(micro)] = b
