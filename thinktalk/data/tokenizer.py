"""thinktalk-tiny's own tokenizer: a small byte-level BPE trained on the generated text, in the official files.

The official Qwen3-Omni vocabulary has 151k tokens with the special tokens at 151643+; a 30 MB model cannot
carry embeddings that wide, so this tokenizer is small (``vocab_size`` BPE tokens, byte alphabet included)
and puts the Qwen3-Omni special tokens right after the BPE vocabulary. The checkpoint's ``config.json``
carries those ids (:mod:`thinktalk.data.model`). The pre-tokenizer, normalizer and decoder are the official
Qwen2 ones; the chat roles ``system``/``user``/``assistant`` are single tokens, as in the real vocabulary (the
Qwen3 Talker finds turns by the ids of ``<|im_start|>assistant``).

Files written: ``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``chat_template.json``,
``preprocessor_config.json``, ``video_preprocessor_config.json``; thinktalk's Processor and the reference's
``AutoProcessor`` both load them.
"""

from __future__ import annotations

import json
import os

from thinktalk.testing.tokenizer import (
    QWEN3_OMNI_ADDED_TOKENS,
    QWEN3_OMNI_MM_TOKENS,
    preprocessor_config,
    untrained_qwen2_bpe,
)

ROLES = ("system", "user", "assistant")

# Its own chat template: the Qwen3-Omni placeholders, no default system prompt, no thinking block (the tiny
# model never thinks, and every answer token is a training target).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'audio' or 'audio' in item or 'audio_url' in item -%}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Pictures of 96 x 96 pixels (9 merged tokens) stay as they are; video frames are kept small (a 96 x 96
# frame is 9 tokens per temporal patch, not the official minimum of 128).
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 64 * 64, 160 * 160
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 64 * 64, 128 * 128


def train_bpe(texts: list[str], vocab_size: int = 512) -> dict:
    """A byte-level BPE with the Qwen2 pre-tokenizer trained on ``texts`` (deterministic); the tokenizer.json dict."""
    from tokenizers import pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the byte alphabet ({len(alphabet)})")
    tok = untrained_qwen2_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, initial_alphabet=alphabet
    )
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())
    data["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return data


def special_token_ids(bpe_size: int) -> dict[str, int]:
    """Ids of the added tokens: the Qwen3-Omni specials in their official order, then the role words."""
    names = [content for _, content, _ in QWEN3_OMNI_ADDED_TOKENS] + list(ROLES)
    return {name: bpe_size + i for i, name in enumerate(names)}


def build_tokenizer_json(texts: list[str], vocab_size: int = 512) -> tuple[dict, dict[str, int]]:
    data = train_bpe(texts, vocab_size)
    vocab = data["model"]["vocab"]
    bpe_size = len(vocab)
    if sorted(vocab.values()) != list(range(bpe_size)):
        raise AssertionError("BPE ids are not 0..n-1")
    ids = special_token_ids(bpe_size)
    special = {content: flag for _, content, flag in QWEN3_OMNI_ADDED_TOKENS}
    data["added_tokens"] = []
    for content, token_id in ids.items():
        # An added token must also be in the BPE vocabulary at its id: `tokenizers` renumbers added tokens it
        # does not find there. A role word the BPE already has keeps its BPE entry (and its id) as an alias.
        vocab.setdefault(content, token_id)
        data["added_tokens"].append({"id": vocab[content], "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": special.get(content, False)})  # fmt: skip
        ids[content] = vocab[content]
    return data, ids


def tokenizer_config(ids: dict[str, int]) -> dict:
    specials = {content for _, content, flag in QWEN3_OMNI_ADDED_TOKENS if flag}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": content in specials,
            }  # fmt: skip
            for content, token_id in sorted(ids.items(), key=lambda kv: kv[1])
        },
        "additional_special_tokens": [c for c in ids if c in specials and c != "<|endoftext|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "processor_class": "Qwen3OmniMoeProcessor",
        "chat_template": CHAT_TEMPLATE,
        **QWEN3_OMNI_MM_TOKENS,
    }


def preprocessor_configs() -> tuple[dict, dict]:
    """``preprocessor_config.json`` (Whisper features, small pictures) and ``video_preprocessor_config.json``."""
    pre = preprocessor_config("qwen3_omni_moe")
    pre.update(
        min_pixels=IMAGE_MIN_PIXELS,
        max_pixels=IMAGE_MAX_PIXELS,
        size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
    )
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen3OmniMoeProcessor",
        "image_mean": pre["image_mean"],
        "image_std": pre["image_std"],
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_frames": 4,
        "max_frames": 64,
    }
    return pre, video


def read_texts(data_dir: str) -> list[str]:
    """The training text of a generated data set (``text.txt``) plus the chat roles."""
    path = os.path.join(data_dir, "text.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: generate the data first (python -m thinktalk.data --out {data_dir})"
        )
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh if line.strip()]


def write_tokenizer(directory: str, texts: list[str], vocab_size: int = 512) -> dict[str, int]:
    """Train on ``texts`` and write the tokenizer/processor files into ``directory``; returns the special ids."""
    os.makedirs(directory, exist_ok=True)
    data, ids = build_tokenizer_json(texts, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    pre, video = preprocessor_configs()
    files = {
        "tokenizer.json": json.dumps(data, ensure_ascii=False, indent=2),
        "vocab.json": json.dumps(data["model"]["vocab"], ensure_ascii=False, indent=2),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(ids), ensure_ascii=False, indent=2),
        "chat_template.json": json.dumps({"chat_template": CHAT_TEMPLATE}, ensure_ascii=False, indent=2),
        "preprocessor_config.json": json.dumps(pre, indent=2),
        "video_preprocessor_config.json": json.dumps(video, indent=2),
    }
    for name, text in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    return ids
