"""``thinktalk bench``: thinktalk against the reference (transformers 5.23) in one process, on the same random weights.

The Qwen2.5-Omni model is built at the chosen shapes with random weights (O(1) activations; the Talker's codec
head rows >= 8192 zeroed so that it never ends early nor leaves the DiT's codebook); the reference loads the
very same tensors. Both answer an audio prompt with exactly ``text_tokens`` tokens and ``codes`` codec ids.
Rows (batch 1, greedy, the fastest of ``repeats`` runs):

* end to end — ``generate(return_audio=True)`` (thinktalk) against the reference's ``generate``: text + speech,
  whole waveform at the end (the reference's only mode);
* first audio — thinktalk's ``stream`` (Talker interleaved with the Thinker, sliding-window Token2Wav) against
  the reference's end of ``generate``;
* Token2Wav — codes → waveform alone, thinktalk's ``token2wav`` against the reference's, same codes and noise.

With ``compile=True`` the thinktalk rows are measured again after :func:`thinktalk.compile_speech` (the DiT,
BigVGAN's anti-aliased activations and the LLMs' decode steps through torch.compile), in a second column; the first call of each row, which compiles, is the warm-up
and is reported as ``compile_s``.

``bench/qwen25_speech.py`` (first audio, RTF, Talker codes/s per shape) and ``bench/thinker.py`` share the
builders below. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import copy
import gc
import math
import platform
import time

import torch

from thinktalk.testing.speech import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START
from thinktalk.testing.tiny import TINY_QWEN25_OMNI


def _rope(section: list[int]) -> dict:
    return {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}


def shapes(name: str) -> dict:
    cfg = copy.deepcopy(TINY_QWEN25_OMNI)
    if name == "tiny":
        return cfg
    th, tk, t2w = cfg["thinker_config"], cfg["talker_config"], cfg["token2wav_config"]
    if name == "small":  # 4 layers, 256 wide everywhere
        th["audio_config"].update(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024,
                                  output_dim=256, n_window=100)
        th["vision_config"].update(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=256,
                                   window_size=112, fullatt_block_indexes=[3])
        th["text_config"].update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, rope_parameters=_rope([8, 12, 12]))
        tk.update(embedding_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_parameters=_rope([8, 12, 12]))
        t2w["dit_config"].update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64, emb_dim=128,
                                 look_ahead_layers=[2], look_backward_layers=[0, 3], enc_emb_dim=192, enc_dim=64,
                                 enc_channels=[64, 64, 64, 64, 192], enc_attention_channels=32, enc_se_channels=32,
                                 num_embeds=8193)
        t2w["bigvgan_config"].update(upsample_initial_channel=256, resblock_kernel_sizes=[3, 7, 11],
                                     resblock_dilation_sizes=[[1, 3, 5]] * 3)
        return cfg
    if name == "7b":  # Qwen/Qwen2.5-Omni-7B's config.json (the fields that shape the model)
        th["audio_config"].update(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                  output_dim=3584, n_window=100)
        th["vision_config"].update(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        th["text_config"].update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, rope_parameters=_rope([16, 24, 24]))
        tk.update(embedding_size=3584, hidden_size=896, intermediate_size=18944, num_hidden_layers=24,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=128, rope_parameters=_rope([16, 24, 24]))
        cfg["token2wav_config"] = {"dit_config": {}, "bigvgan_config": {}}  # the defaults are the published ones
        return cfg
    raise SystemExit(f"unknown shapes '{name}' (tiny, small, 7b)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_(model: torch.nn.Module) -> None:
    """Random weights with O(1) activations: matrices std 1/sqrt(fan_in), norms 1, other vectors std 0.02."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.02)
            else:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
        # No end token and no code outside the DiT's codebook: every row >= 8192 scores 0, below the best.
        model.talker.codec_head.weight[8192:] = 0


def speakers(cfg_dict: dict) -> dict:
    dit = cfg_dict["token2wav_config"]["dit_config"]
    gen = torch.Generator().manual_seed(0)
    voice = {"bos_token": 151872, "cond": torch.randn(1, dit.get("enc_emb_dim", 192), generator=gen),
             "ref_mel": torch.randn(1, 400, 80, generator=gen) * 2 - 5}
    return {"Chelsie": voice}


def build_ours(cfg_dict: dict, device: torch.device, dtype: torch.dtype):
    from thinktalk.checkpoint import materialize_buffers
    from thinktalk.models.qwen2_5_omni.config import Qwen25OmniConfig
    from thinktalk.models.qwen2_5_omni.model import Qwen25Omni

    with torch.device("meta"):
        model = Qwen25Omni(Qwen25OmniConfig.from_hf(cfg_dict))
    model.to_empty(device=device)
    torch.manual_seed(0)
    random_(model)
    model.thinker.to(dtype)
    model.talker.to(dtype)
    materialize_buffers(model, device)
    model.speakers = speakers(cfg_dict)
    model.tokenizer = None
    return model.eval()


def reference_name(name: str) -> str:
    """Checkpoint (= thinktalk) name → the reference's in-memory name (transformers 5 nests the Thinker's parts)."""
    for ckpt, mem in (("thinker.audio_tower.", "thinker.model.audio_tower."), ("thinker.visual.", "thinker.model.visual."),
                      ("thinker.model.", "thinker.model.language_model.")):
        if name.startswith(ckpt):
            return mem + name[len(ckpt):]
    return name


def build_reference(cfg_dict: dict, ours, device: torch.device, dtype: torch.dtype):
    import transformers

    config = transformers.Qwen2_5OmniConfig(**{k: v for k, v in cfg_dict.items() if k not in ("model_type", "architectures")})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = transformers.Qwen2_5OmniForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    ref.token2wav.float()
    missing, unexpected = ref.load_state_dict({reference_name(k): v for k, v in ours.state_dict().items()}, strict=False)
    persistent = {n for n, _ in ref.named_parameters()}
    if unexpected or set(missing) & persistent:
        raise RuntimeError(f"weights do not line up: missing {sorted(set(missing) & persistent)[:5]}, unexpected {unexpected[:5]}")
    ref.speaker_map = ours.speakers
    return ref.eval()


def audio_prompt(seconds: float, device) -> dict:
    frames = int(seconds * 100)
    n = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    ids = [IM_START, 872, 198, AUDIO_BOS] + [AUDIO] * n + [AUDIO_EOS, 3838, 374, IM_END, 198, IM_START, 77091, 198]
    ids = torch.tensor([ids], device=device)
    feats = torch.randn(1, 128, frames, generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "input_features": feats,
            "feature_attention_mask": torch.ones(1, frames, dtype=torch.long, device=device)}


def best_time(fn, repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up (shared machines are noisy; the minimum is the code's speed).

    On the CPU with one torch thread the process's CPU time is measured instead of the wall: what other programs on
    a shared machine take then does not count (with more threads, waiting threads would count as work)."""
    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    return min(times)


def run(shape: str = "tiny", device: str = "cpu", dtype: str | None = None, text_tokens: int = 16, codes: int = 100,
        audio_seconds: float = 2.0, repeats: int = 3, threads: int | None = None, reference: bool = True,
        compile: bool = False) -> dict:
    """Measure the rows of the module docstring; a dict with the setup and, per row, seconds for both and the ratio."""
    dev = torch.device(device)
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if threads:
        torch.set_num_threads(threads)
    cfg = shapes(shape)
    prompt = audio_prompt(audio_seconds, dev)
    ours = build_ours(cfg, dev, dt)
    kw = dict(speaker="Chelsie", eos_token_id=[-1], talker_do_sample=False, seed=0)
    gen = torch.Generator().manual_seed(0)
    code_ids = torch.randint(0, 8192, (1, codes), generator=gen).to(dev)
    noise = torch.randn(1, 2 * codes, 80, generator=gen).to(dev)
    voice = ours.speakers["Chelsie"]
    result: dict = {
        "setup": {"family": "qwen2_5_omni", "shapes": shape, "device": str(dev), "dtype": str(dt).replace("torch.", ""),
                  "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
                  "prompt": f"{audio_seconds:g} s audio + text", "text_tokens": text_tokens, "codes": codes,
                  "speech_s": codes / 50, "ode_steps": 10, "repeats": repeats,
                  "clock": "process CPU time" if dev.type == "cpu" and torch.get_num_threads() == 1 else "wall"},  # fmt: skip
        "rows": {},
    }

    def e2e():
        with torch.inference_mode():
            ours.generate(**prompt, max_new_tokens=text_tokens, talker_max_new_tokens=codes, return_audio=True, **kw)

    clock = time.process_time if dev.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter

    def first_audio() -> float:
        sync(dev)
        t0 = clock()
        with torch.inference_mode():
            for ev in ours.stream(**prompt, max_new_tokens=text_tokens, talker_max_new_tokens=codes, **kw):
                if ev.kind == "audio":
                    sync(dev)
                    return clock() - t0
        return float("nan")

    def t2w():
        with torch.inference_mode():
            ours.token2wav(code_ids, voice["cond"], voice["ref_mel"], num_steps=10, noise=noise)

    rows = result["rows"]
    e2e_row, first_row, t2w_row = "end to end, text + speech (s)", "first audio (s)", "Token2Wav, codes -> waveform (s)"
    rows[e2e_row] = {"thinktalk": best_time(e2e, repeats, dev)}
    first_audio()
    rows[first_row] = {"thinktalk": min(first_audio() for _ in range(max(1, repeats)))}
    rows[t2w_row] = {"thinktalk": best_time(t2w, repeats, dev)}
    if compile:
        from thinktalk.generation.compiled import compile_speech, uncompile

        compile_speech(ours)
        t0 = time.perf_counter()
        t2w(), e2e(), first_audio()  # every shape the rows use: compiled here
        result["setup"]["compile_s"] = time.perf_counter() - t0
        rows[e2e_row]["compiled"] = best_time(e2e, repeats, dev)
        rows[first_row]["compiled"] = min(first_audio() for _ in range(max(1, repeats)))
        rows[t2w_row]["compiled"] = best_time(t2w, repeats, dev)
        uncompile(ours)
    if reference:
        ref = build_reference(cfg, ours, dev, dt)
        rkw = dict(speaker="Chelsie", thinker_do_sample=False, thinker_eos_token_id=None, talker_do_sample=False)

        def ref_e2e():
            with torch.no_grad():
                ref.generate(**prompt, thinker_max_new_tokens=text_tokens, talker_max_new_tokens=codes, **rkw)

        def ref_t2w():
            with torch.no_grad():
                ref.token2wav(code_ids, conditioning=voice["cond"].to(dev), reference_mel=voice["ref_mel"].to(dev),
                              num_steps=10, guidance_scale=0.5, sway_coefficient=-1.0)  # fmt: skip

        e = best_time(ref_e2e, repeats, dev)
        rows["end to end, text + speech (s)"]["reference"] = e
        rows["first audio (s)"]["reference"] = e  # the reference returns audio once, at the end
        rows["Token2Wav, codes -> waveform (s)"]["reference"] = best_time(ref_t2w, repeats, dev)
        del ref
    for r in rows.values():
        if "reference" in r:
            r["speedup"] = r["reference"] / r["thinktalk"]
            if "compiled" in r:
                r["speedup_compiled"] = r["reference"] / r["compiled"]
    gc.collect()
    return result


def format_table(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"thinktalk vs reference (transformers 5.23), same process, same random weights — {s['family']} {s['shapes']} "
        f"shapes, {s['device']} ({s['machine']}, {s['threads']} threads), {s['dtype']}, torch {s['torch']}",
        f"prompt: {s['prompt']} -> {s['text_tokens']} text tokens + {s['codes']} codec ids ({s['speech_s']:g} s of "
        f"speech), {s['ode_steps']} ODE steps, batch 1, best of {s['repeats']} ({s['clock']}, seconds)",
        "",
    ]
    compiled = "compile_s" in s
    if compiled:
        lines[-1] = f"compiled: torch.compile of the DiT, BigVGAN's activations and the Thinker's and Talker's decode steps (thinktalk.compile_speech), {s['compile_s']:.0f} s to compile"
        lines.append("")
    lines += ["| | reference | thinktalk | speedup |" + (" compiled | speedup |" if compiled else ""),
              "|---|---:|---:|---:|" + ("---:|---:|" if compiled else "")]
    for name, r in result["rows"].items():
        ref = f"{r['reference']:.3f}" if "reference" in r else "—"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "—"
        line = f"| {name} | {ref} | {r['thinktalk']:.3f} | {sp} |"
        if compiled:
            spc = f"{r['speedup_compiled']:.2f}x" if "speedup_compiled" in r else "—"
            line += f" {r['compiled']:.3f} | {spc} |"
        lines.append(line)
    return "\n".join(lines)
