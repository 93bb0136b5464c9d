"""Tokenizer, chat-template and preprocessor files for tiny checkpoints.

A tiny checkpoint needs real tokenizer files: tests compare thinktalk's processor with the reference
one on them, and the README demo decodes with them. The official vocabulary (151k byte-level BPE
tokens) is not shipped here, so :func:`write_tokenizer_files` trains a small byte-level BPE (a few
hundred merges, deterministic) on the English text below and puts the Qwen special tokens at their
**official ids** (``<|im_start|>`` = 151644, ``<|AUDIO|>`` = 151646, ...), so configs, position ids
and generation code see the same ids as with the real checkpoints. The pre-tokenizer, normalizer and
decoder are the official Qwen2 ones, and so are the chat templates and the preprocessor settings.

Both thinktalk (:class:`thinktalk.processing.Processor`) and the reference
(``transformers.AutoProcessor``) load the directory this writes.
"""

from __future__ import annotations

import functools
import json
import os

# The official Qwen2 pre-tokenization regex (tokenizer.json of every Qwen2/2.5/3 checkpoint).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (id, content, special) of the added tokens of the official checkpoints.
QWEN25_OMNI_ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|AUDIO|>", True),
    (151647, "<|audio_bos|>", True),
    (151648, "<|audio_eos|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_bos|>", True),
    (151653, "<|vision_eos|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|IMAGE|>", True),
    (151656, "<|VIDEO|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]

QWEN3_OMNI_ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
    (151669, "<|audio_start|>", True),
    (151670, "<|audio_end|>", True),
    (151671, "<tts_pad>", True),
    (151672, "<tts_text_bos>", True),
    (151673, "<tts_text_eod>", True),
    (151674, "<tts_text_bos_single>", True),
    (151675, "<|audio_pad|>", True),
]

# The model-specific token names the reference processors read off the tokenizer.
QWEN25_OMNI_MM_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
QWEN3_OMNI_MM_TOKENS = {
    "image_token": "<|image_pad|>",
    "audio_token": "<|audio_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

# Qwen/Qwen2.5-Omni-7B chat_template.json (the same template ships with the 3B).
QWEN25_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Qwen3-Omni-30B-A3B-Instruct chat template: Qwen3's (system/tools prologue, reasoning kept only
# after the last real user query) with Qwen3-Omni's audio/image/video placeholders. Written from the
# published template's structure; the hub copy could not be fetched here to compare byte for byte.
QWEN3_OMNI_CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- set audio_count = namespace(value=0) -%}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}
                {%- set image_count.value = image_count.value + 1 -%}
                {%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif item.type == 'audio' or 'audio' in item or 'audio_url' in item -%}
                {%- set audio_count.value = audio_count.value + 1 -%}
                {%- if add_audio_id -%}{{- 'Audio ' ~ audio_count.value ~ ': ' -}}{%- endif -%}
                {{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}
            {%- elif item.type == 'video' or 'video' in item -%}
                {%- set video_count.value = video_count.value + 1 -%}
                {%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def preprocessor_config(family: str) -> dict:
    """``preprocessor_config.json`` of the official checkpoints (Whisper features + Qwen2-VL images)."""
    patch_size = 14 if family == "qwen2_5_omni" else 16
    processor_class = "Qwen2_5OmniProcessor" if family == "qwen2_5_omni" else "Qwen3OmniMoeProcessor"
    return {
        "chunk_length": 300,
        "dither": 0.0,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": 128,
        "hop_length": 160,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": OPENAI_CLIP_STD,
        "max_pixels": 12845056,
        "merge_size": 2,
        "min_pixels": 3136,
        "n_fft": 400,
        "n_samples": 4800000,
        "nb_max_frames": 30000,
        "padding_side": "right",
        "padding_value": 0.0,
        "patch_size": patch_size,
        "processor_class": processor_class,
        "return_attention_mask": True,
        "sampling_rate": 16000,
        "temporal_patch_size": 2,
    }


def video_preprocessor_config(family: str) -> dict:
    """``video_preprocessor_config.json``: the per-frame pixel range the reference uses for videos."""
    factor = 28 if family == "qwen2_5_omni" else 32
    config = preprocessor_config(family)
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": config["processor_class"],
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "size": {"shortest_edge": 128 * factor * factor, "longest_edge": 768 * factor * factor},
        "patch_size": config["patch_size"],
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_frames": 4,
        "max_frames": 768,
    }


# Public-domain-style English prose written for this file: enough variety for a few hundred merges.
_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello, world! How are you today? I am fine, thank you. What is the weather like where you live?
The model listens to the audio, looks at the image, watches the video and then it answers in text and speech.
Describe what you see in this picture. What sound is this? Please transcribe the speech in the recording.
The cat sat on the mat. The dog barked at the mailman. Birds sing in the morning and the sun rises in the east.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2025. Dates like 2024-05-01 and times like 12:30.
Music, speech, noise and silence are all kinds of sound. A voice can be loud or quiet, high or low, fast or slow.
In the beginning there was a small village by the river. People fished, farmed and traded with their neighbours.
Every evening the children gathered around the fire to listen to stories about the stars and the sea.
The scientist measured the temperature of the water and wrote the results in her notebook.
Red, green, blue, yellow, orange, purple, black and white are colours. Circles, squares and triangles are shapes.
You are a helpful assistant. You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group,
capable of perceiving auditory and visual inputs, as well as generating text and speech.
Thinking and talking: the thinker writes text, the talker turns it into speech tokens, and a vocoder makes a waveform.
Can you help me write a short poem about the ocean? The waves roll in, the waves roll out, the gulls cry overhead.
The train leaves the station at seven o'clock and arrives in the city two hours later.
She said: "I don't know, but I'll find out." He replied: "We're going to be late, aren't we?"
Mathematics: two plus two is four; three times three is nine; the square root of sixteen is four.
Programming: def main(): print("hello") return 0. Lists, tuples, dictionaries and sets are data types.
The library was quiet. Rows of books stretched from the floor to the ceiling, and dust danced in the light.
Spring, summer, autumn and winter are the four seasons. Rain falls, snow melts, leaves turn gold and fall.
The orchestra tuned their instruments; violins, cellos, flutes and drums filled the hall with sound.
A good answer is short, clear and correct. If you are not sure, say so, and explain what you would check.
The robot picked up the red block and placed it on top of the blue one, then it waved its arm.
Open the window, please. Close the door. Turn left at the corner, then walk straight for two blocks.
Where is the nearest hospital? Which way to the museum? When does the shop open? Why is the sky blue?
The quick brown fox jumps over the lazy dog again, because repetition helps a small tokenizer learn merges.
"""


def _added_tokens(family: str) -> list[tuple[int, str, bool]]:
    if family == "qwen2_5_omni":
        return QWEN25_OMNI_ADDED_TOKENS
    if family == "qwen3_omni_moe":
        return QWEN3_OMNI_ADDED_TOKENS
    raise ValueError(f"unknown model family {family!r}; expected 'qwen2_5_omni' or 'qwen3_omni_moe'")


def untrained_qwen2_bpe():
    """An empty byte-level BPE ``tokenizers.Tokenizer`` with the Qwen2 normalizer, pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


@functools.lru_cache(maxsize=4)
def _tokenizer_json(family: str, num_merges: int) -> str:
    """Train the byte-level BPE (deterministic) and return the ``tokenizer.json`` text."""
    from tokenizers import pre_tokenizers, trainers

    tok = untrained_qwen2_bpe()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    lines = _TRAINING_TEXT.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    data = json.loads(tok.to_str())
    data["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    # The added tokens must live in the BPE vocabulary at their ids: `tokenizers` renumbers added
    # tokens it does not find there (sequentially after the vocabulary), whatever id the JSON says.
    for token_id, content, _ in _added_tokens(family):
        data["model"]["vocab"][content] = token_id
    data["added_tokens"] = [
        {
            "id": token_id,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for token_id, content, special in _added_tokens(family)
    ]
    # The role words encode to their official single-token ids, as in the real vocabulary: the Qwen3
    # Talker (ours and the reference's) finds the turns of a prompt by the ids of "<|im_start|>assistant".
    for token_id, content in ROLE_TOKENS:
        data["model"]["vocab"][content] = token_id
        data["added_tokens"].append(
            {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False}
        )
    return json.dumps(data, ensure_ascii=False, indent=2)


# Official ids of the chat roles in the Qwen2/Qwen3 vocabulary.
ROLE_TOKENS = ((8948, "system"), (872, "user"), (77091, "assistant"))


def tokenizer_config(family: str) -> dict:
    """``tokenizer_config.json`` as the official checkpoints write it (special tokens, class, limits)."""
    added = _added_tokens(family)
    mm_tokens = QWEN25_OMNI_MM_TOKENS if family == "qwen2_5_omni" else QWEN3_OMNI_MM_TOKENS
    specials = [content for _, content, special in added if special and content not in ("<|endoftext|>",)]
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for token_id, content, special in [*added, *((i, c, False) for i, c in ROLE_TOKENS)]
        },
        "additional_special_tokens": specials,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "processor_class": preprocessor_config(family)["processor_class"],
    }
    config.update(mm_tokens)
    return config


def chat_template(family: str) -> str:
    _added_tokens(family)
    return QWEN25_OMNI_CHAT_TEMPLATE if family == "qwen2_5_omni" else QWEN3_OMNI_CHAT_TEMPLATE


def write_tokenizer_files(directory: str, family: str, num_merges: int = 400) -> list[str]:
    """Write ``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``chat_template.json``, ``preprocessor_config.json`` and ``video_preprocessor_config.json``.

    ``family`` is a ``config.json`` ``model_type``: ``"qwen2_5_omni"`` or ``"qwen3_omni_moe"``.
    Returns the paths written. Deterministic: the same call writes the same bytes.
    """
    os.makedirs(directory, exist_ok=True)
    tokenizer_json = _tokenizer_json(family, num_merges)
    model = json.loads(tokenizer_json)["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    files = {
        "tokenizer.json": tokenizer_json,
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False, indent=2),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(family), ensure_ascii=False, indent=2),
        "chat_template.json": json.dumps({"chat_template": chat_template(family)}, ensure_ascii=False, indent=2),
        "preprocessor_config.json": json.dumps(preprocessor_config(family), indent=2),
        "video_preprocessor_config.json": json.dumps(video_preprocessor_config(family), indent=2),
    }
    paths = []
    for name, text in files.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        paths.append(path)
    return paths
