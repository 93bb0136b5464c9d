"""Sampling completions with thinktalk's own generation (``model.generate``) for on-policy recipes.

Prompts are encoded examples (ending in the generation prompt); each is sampled ``group`` times in
one left-padded batch, its media repeated. A completion keeps its tokens up to and including the
first end token; the training example is prompt + completion with labels on the completion and
TMRoPE positions recomputed for the whole row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinktalk.train.data import IGNORE, Example, collate_media


@dataclass
class Completion:
    prompt: Example
    ids: list[int]  # generated tokens, the end token included when the answer ended
    text: str
    finished: bool  # ended on an end token (not cut by max_new_tokens)


def generation_inputs(prompts: list[Example], group: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded model inputs of every prompt repeated ``group`` times (rows p0, p0, ..., p1, p1, ...)."""
    rows = [p for p in prompts for _ in range(group)]
    longest = max(p.length for p in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, p in enumerate(rows):
        input_ids[i, longest - p.length :] = p.input_ids
        mask[i, longest - p.length :] = 1
    return {"input_ids": input_ids, "attention_mask": mask, **collate_media(rows)}


def sample(
    model,
    prompts: list[Example],
    group: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int,
    device: torch.device,
) -> list[Completion]:
    """``group`` sampled completions per prompt (in prompt order)."""
    inputs = {k: v.to(device) for k, v in generation_inputs(prompts, group, pad_id).items()}
    res = model.generate(
        **inputs, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
        seed=seed,
    )
    eos = set(model.eos_token_ids)
    out = []
    # Outside inference mode: a plain copy (inference tensors cannot be saved for backward).
    ids_all = res.text_ids.clone().cpu().tolist()
    for i, row in enumerate(ids_all):
        cut = next((j for j, t in enumerate(row) if t in eos), None)
        ids = row if cut is None else row[: cut + 1]
        text = model.tokenizer.decode(ids, skip_special_tokens=True) if model.tokenizer is not None else ""
        out.append(Completion(prompts[i // group], ids, text, finished=cut is not None))
    return out


def training_example(c: Completion, positions, use_audio_in_video: bool) -> Example:
    """Prompt + completion as one row, labels on the completion."""
    p = c.prompt
    completion = torch.tensor(c.ids, dtype=torch.long)
    ids = torch.cat([p.input_ids, completion])
    labels = torch.cat([torch.full_like(p.input_ids, IGNORE), completion])
    return Example(ids, labels, positions(ids[None], p.media, use_audio_in_video), p.media, p.row)
