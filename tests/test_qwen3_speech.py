"""Qwen3-Omni speech: Talker + code predictor codes and Code2Wav waveforms against the reference; streaming."""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import thinker_cases, tiny3_weights  # noqa: F401
from thinktalk.testing.speech import qwen3_reference_speech

transformers = pytest.importorskip("transformers")

CASES = thinker_cases()
THINKER_TOKENS, FRAMES = 10, 14


@pytest.fixture(scope="module")
def ref(tiny3_weights):  # noqa: F811
    m = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny3_weights, dtype=torch.float32).eval()
    # Reference quirk: the Talker's position ids read ``config.audio_config.n_window``, which only the
    # Thinker's config has, so audio + image/video inputs crash its speech generation. Give it the
    # Thinker's (what thinktalk uses) to compare those cases too.
    m.talker.config.audio_config = m.config.thinker_config.audio_config
    return m


@pytest.fixture(scope="module")
def ours(tiny3_weights):  # noqa: F811
    return thinktalk.load(tiny3_weights)


def reference_speech(ref, inputs, use_aiv, eos=151645, speaker="ethan"):
    """(new text ids, codes [frames, G], waveform) from the reference's generate (greedy)."""
    return qwen3_reference_speech(ref, inputs, use_audio_in_video=use_aiv, speaker=speaker,
                                  thinker_max_new_tokens=THINKER_TOKENS, thinker_do_sample=False,
                                  thinker_eos_token_id=eos, talker_do_sample=False, talker_max_new_tokens=FRAMES)


def ours_speech(ours, inputs, use_aiv, eos=151645, speaker="ethan"):
    return ours.generate(
        **inputs, use_audio_in_video=use_aiv, speaker=speaker, return_audio=True, max_new_tokens=THINKER_TOKENS,
        eos_token_id=eos, talker_do_sample=False, talker_max_new_tokens=FRAMES,
    )


@pytest.mark.parametrize("name", ["audio", "image", "multi_turn", "video_with_audio"])
def test_greedy_codes_match_reference(name, ref, ours):
    inputs, use_aiv = CASES[name]
    ref_text, ref_codes, ref_wav = reference_speech(ref, inputs, use_aiv)
    res = ours_speech(ours, inputs, use_aiv)
    assert torch.equal(res.text_ids, ref_text)
    codes = res.codes[0]
    assert codes.shape == ref_codes.shape == (FRAMES - 1, 16)  # the last codebook-0 is never completed
    assert torch.equal(codes, ref_codes)
    assert res.audio[0].shape == ref_wav.shape
    diff = (res.audio[0] - ref_wav).abs().max().item()
    print(f"{name}: waveform max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_codes_match_when_the_text_ends_early(ref, ours):
    """The Thinker stops after a few tokens: the Talker reads tts_eos, then tts_pad, as the reference."""
    inputs, use_aiv = CASES["audio"]
    first = ours.generate(**inputs, max_new_tokens=THINKER_TOKENS, eos_token_id=()).text_ids[0].tolist()
    end = next(i for i in range(3, len(first)) if first[i] not in first[:i])  # a token seen first at i >= 3
    ref_text, ref_codes, _ = reference_speech(ref, inputs, use_aiv, eos=first[end], speaker="chelsie")
    res = ours_speech(ours, inputs, use_aiv, eos=first[end], speaker="chelsie")
    assert res.text_ids.shape[1] == ref_text.shape[1] == end + 1
    assert torch.equal(res.text_ids, ref_text)
    assert torch.equal(res.codes[0], ref_codes)


@pytest.mark.parametrize("frames", [1, 6, 37])
def test_code2wav_matches_reference(ref, ours, frames):
    codes = torch.randint(0, 2048, (2, 16, frames), generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        expected = ref.code2wav(codes)
        wav = ours.code2wav(codes)
        chunked = ref.code2wav.chunked_decode(codes)
    assert wav.shape == expected.shape == (2, 1, ours.code2wav.num_samples(frames))
    assert (wav - expected).abs().max().item() <= 1e-4
    assert (ours.code2wav.decode(codes) - chunked).abs().max().item() <= 1e-4
    assert (expected.abs() < 1).float().mean() > 0.8  # mostly inside the clamp, so the comparison means something


def test_streamed_code2wav_equals_offline(ours):
    c2w = ours.code2wav
    codes = torch.randint(0, 2048, (1, 16, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        offline = c2w(codes)
        for splits in ([1] * 12, [1, 3, 2, 6]):
            state, parts, start = c2w.new_state(), [], 0
            for n in splits:
                wav, state = c2w.stream(codes[..., start : start + n], state)
                assert wav.shape[-1] == c2w.num_samples(start + n) - c2w.num_samples(start)
                parts.append(wav)
                start += n
            streamed = torch.cat(parts, dim=-1)
            assert streamed.shape == offline.shape
            assert (streamed - offline).abs().max().item() <= 2e-4 * max(1.0, offline.abs().max().item())
        # Chunked offline decoding goes through the same stream.
        assert (c2w.decode(codes, chunk_frames=5) - offline).abs().max().item() <= 2e-4
    assert c2w.num_samples(1) == 1920 - 555 and c2w.samples_per_frame == 1920  # 80 ms at 24 kHz


def test_code2wav_streams_of_several_conversations_batch(ours):
    """stream_many: streams at different frame positions (fewer frames than the sliding window, more than it, two
    first frames) step as one batch, and each gets the samples it gets streamed alone."""
    c2w = ours.code2wav
    window = c2w.cfg.sliding_window
    g = torch.Generator().manual_seed(3)
    lengths = [1, 3, window + 4, 2 * window + 1]  # frames already decoded per conversation (0: a first frame)
    codes = [torch.randint(0, 2048, (1, 16, n + 2), generator=g) for n in lengths]
    with torch.no_grad():
        alone, states = [], []
        for c, n in zip(codes, lengths):
            state = c2w.new_state()
            if n:
                _, state = c2w.stream(c[..., :n], state)
            # stream() updates its state's conv contexts in place: keep a copy for stream_many
            states.append(type(state)(frames=state.frames, kv=list(state.kv), convs=dict(state.convs)))
            alone.append([])
            s = state
            for j in range(2):
                wav, s = c2w.stream(c[..., n + j : n + j + 1], s)
                alone[-1].append(wav)
        for _ in range(2):  # two streams that have decoded nothing yet (their first frames batch together)
            fresh = torch.randint(0, 2048, (1, 16, 2), generator=g)
            codes.append(fresh)
            states.append(c2w.new_state())
            lengths.append(0)
            first = [c2w.stream(fresh[..., :1], c2w.new_state())]
            first.append(c2w.stream(fresh[..., 1:2], first[0][1]))
            alone.append([w for w, _ in first])
        for j in range(2):
            done = c2w.stream_many([c[..., n + j : n + j + 1] for c, n in zip(codes, lengths)], states)
            states = [st for _, st in done]
            for k, (wav, st) in enumerate(done):
                assert st.frames == lengths[k] + j + 1
                assert wav.shape == alone[k][j].shape
                assert (wav - alone[k][j]).abs().max().item() <= 1e-4, (k, j)  # batched kernels round differently
    assert max(alone[-3][1].abs().max().item(), alone[0][0].abs().max().item()) > 1e-3  # real samples compared


def test_stream_emits_audio_from_the_first_frame_and_matches_generate(ours):
    inputs, _ = CASES["image"]
    kwargs = dict(speaker="aiden", max_new_tokens=THINKER_TOKENS, eos_token_id=151645, talker_max_new_tokens=FRAMES)
    offline = ours.generate(**inputs, return_audio=True, talker_do_sample=False, **kwargs)
    events = list(ours.stream(**inputs, talker_do_sample=False, **kwargs))
    assert events[-1].kind == "done"
    audio = [e for e in events if e.kind == "audio"]
    text = [e for e in events if e.kind == "text"]
    assert len(audio) == FRAMES - 1 and len(text) == THINKER_TOKENS
    assert audio[0].audio.shape[0] == ours.code2wav.num_samples(1)  # the first frame alone is audible
    assert all(e.audio.shape[0] == 1920 for e in audio[1:])
    # The first audio arrives before the Thinker has finished the answer.
    order = [e.kind for e in events]
    assert order.index("audio") < max(i for i, k in enumerate(order) if k == "text")
    streamed = torch.cat([e.audio for e in audio])
    assert streamed.shape == offline.audio[0].shape
    assert (streamed - offline.audio[0]).abs().max().item() <= 2e-4
    assert all(e.sample_rate == 24000 for e in audio)


def test_sampled_speech_is_reproducible(ours):
    inputs, _ = CASES["audio"]
    kwargs = dict(speaker="ethan", max_new_tokens=6, do_sample=True, seed=7, talker_max_new_tokens=8)
    a = ours.generate(**inputs, return_audio=True, **kwargs)
    b = ours.generate(**inputs, return_audio=True, **kwargs)
    assert torch.equal(a.codes[0], b.codes[0]) and torch.equal(a.text_ids, b.text_ids)
    streamed = torch.cat([e.audio for e in ours.stream(**inputs, **kwargs) if e.kind == "audio"])
    assert (streamed - a.audio[0]).abs().max().item() <= 2e-4


def test_unknown_speaker_lists_the_voices(ours):
    inputs, _ = CASES["text"]
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        ours.generate(**inputs, return_audio=True, speaker="nobody", max_new_tokens=2)
