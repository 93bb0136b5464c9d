"""How training runs the Thinker, and the token-level losses over its last hidden states.

Training never materialises logits for every position: :func:`targets` picks the hidden states
that predict a label (position t - 1 predicts label t), and the LM head runs only on those — in
chunks of ``chunk_size`` tokens under activation checkpointing when asked, so a 32k-token row with a
152k vocabulary keeps one chunk of logits alive at a time. ``chunk_size=0`` is the plain path
(all selected positions at once) the chunked one is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from thinktalk.train.data import IGNORE, MEDIA_KEYS, Batch


def positions_fn(thinker, family: str) -> Callable[[torch.Tensor, dict, bool], torch.Tensor]:
    """A function (input_ids [1, T], media tensors, use_audio_in_video) -> TMRoPE positions [3, T] of one
    row, computed alone: what packing needs (every packed row starts at position 0)."""
    from thinktalk.positions import rope_index

    def run(input_ids: torch.Tensor, media: dict, use_audio_in_video: bool) -> torch.Tensor:
        fam = media.get("feature_attention_mask")
        lens = fam.sum(-1) if fam is not None else None
        if family == "qwen3_omni_moe":
            pos, _ = thinker.rope_index(
                input_ids, None, media.get("image_grid_thw"), media.get("video_grid_thw"), lens,
                media.get("video_second_per_grid"), use_audio_in_video,
            )
        else:
            cfg = thinker.cfg
            pos, _ = rope_index(
                input_ids, thinker.token_ids, None, media.get("image_grid_thw"), media.get("video_grid_thw"), lens,
                media.get("video_second_per_grid"), use_audio_in_video, spatial_merge_size=cfg.vision.spatial_merge_size,
                position_id_per_seconds=cfg.position_id_per_seconds, seconds_per_chunk=cfg.seconds_per_chunk,
            )
        return pos[:, 0].cpu()

    return run


def hidden_states(thinker, batch: Batch, use_audio_in_video: bool = False) -> torch.Tensor:
    """The Thinker's last hidden states [B, T, H] (after the final norm) for a training batch.

    Media are encoded and scattered by ``thinker.embed``; the decoder gets the batch's own positions
    (per packed row) and its attention mask (segment ids when packed).
    """
    inputs = batch.inputs
    mask = inputs["attention_mask"]
    media = {k: inputs[k] for k in MEDIA_KEYS if k in inputs}
    emb = thinker.embed(inputs["input_ids"], (mask > 0).long(), use_audio_in_video=use_audio_in_video, **media)
    extra = getattr(emb, "decoder_kwargs", {})
    out = thinker.model(emb.inputs_embeds, batch.position_ids.to(emb.inputs_embeds.device), attention_mask=mask, **extra)
    return out.last_hidden_state


def targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states [N, H] that predict a label, the labels [N], their batch rows [N])."""
    h = hidden[:, :-1]
    y = labels[:, 1:]
    keep = y != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(y)
    return h[keep], y[keep], rows[keep]


def _chunks(n: int, chunk_size: int) -> list[slice]:
    if chunk_size <= 0 or n <= chunk_size:
        return [slice(0, n)]
    return [slice(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]


def _run(fn, chunk_size: int, *args):
    """``fn(*args)``; recomputed in backward (its logits not kept) when chunking."""
    if chunk_size > 0 and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def token_logprobs(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
    """log p(y_i | h_i) [N] in float32, the LM head applied chunk by chunk."""

    def fn(hc, yc):
        logits = head(hc).float()
        return logits.gather(-1, yc[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)

    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    return torch.cat([_run(fn, chunk_size, h[s], y[s]) for s in _chunks(h.shape[0], chunk_size)])


def cross_entropy_sum(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
    """Summed cross-entropy of labels ``y`` [N] given hidden states ``h`` [N, H] (float32 scalar)."""
    if chunk_size <= 0:
        if h.shape[0] == 0:
            return h.new_zeros((), dtype=torch.float32)
        return F.cross_entropy(head(h).float(), y, reduction="sum")
    return -token_logprobs(head, h, y, chunk_size).sum()


def topk_kl_sum(
    head: torch.nn.Module,
    h: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Σ_i KL(p̃_t,i ‖ p_s,i) over the teacher's top-k tokens (forward KL, off-policy distillation).

    ``teacher_ids``/``teacher_logprobs`` [N, k]: the teacher's k most likely tokens and their log
    probabilities; p̃_t renormalises them over the k. p_s is the student's full-vocabulary
    distribution read at those k tokens, so the loss is 0 only when the student puts exactly p̃_t
    on them (and nothing elsewhere).
    """
    teacher = torch.log_softmax(teacher_logprobs.float(), dim=-1)

    def fn(hc, ids, lt):
        logits = head(hc).float()
        ls = logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
        return (lt.exp() * (lt - ls)).sum()

    if h.shape[0] == 0:
        return h.new_zeros((), dtype=torch.float32)
    return sum(_run(fn, chunk_size, h[s], teacher_ids[s], teacher[s]) for s in _chunks(h.shape[0], chunk_size))


def reverse_kl_sum(
    head: torch.nn.Module, h: torch.Tensor, teacher_logits: torch.Tensor, chunk_size: int = 0
) -> torch.Tensor:
    """Σ_i KL(p_s,i ‖ p_t,i) over the full vocabulary (on-policy distillation: mode-seeking)."""
    lt_all = torch.log_softmax(teacher_logits.float(), dim=-1)

    def fn(hc, lt):
        ls = torch.log_softmax(head(hc).float(), dim=-1)
        return (ls.exp() * (ls - lt)).sum()

    if h.shape[0] == 0:
        return h.new_zeros((), dtype=torch.float32)
    return sum(_run(fn, chunk_size, h[s], lt_all[s]) for s in _chunks(h.shape[0], chunk_size))


def teacher_topk(head: torch.nn.Module, h: torch.Tensor, k: int, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, k], log probabilities [N, k]) of the k most likely tokens (no gradient)."""
    ids, lps = [], []
    with torch.no_grad():
        for s in _chunks(h.shape[0], chunk_size or 4096):
            lp = torch.log_softmax(head(h[s]).float(), dim=-1)
            v, i = lp.topk(k, dim=-1)
            ids.append(i)
            lps.append(v)
    if not ids:
        return h.new_zeros((0, k), dtype=torch.long), h.new_zeros((0, k), dtype=torch.float32)
    return torch.cat(ids), torch.cat(lps)
