"""Qwen2.5-Omni Token2Wav: parity with the reference (mel, waveform), the vocoder's receptive field, and
the streamed-vs-offline relation of the sliding-window decoder (see the token2wav module docstring)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import thinktalk
from thinktalk.checkpoint import materialize_buffers
from thinktalk.models.qwen2_5_omni import token2wav
from thinktalk.models.qwen2_5_omni.bigvgan import (
    UnitState,
    kaiser_sinc_filter,
    receptive_field,
    stream_units,
    unit_push,
)
from thinktalk.models.qwen2_5_omni.config import BigVGANConfig
from thinktalk.models.qwen2_5_omni.speakers import load_speakers
from thinktalk.models.qwen2_5_omni.token2wav import (
    StreamOptions,
    Token2Wav,
    VocoderStreamState,
    vocoder_stream_push,
)

# The tiny random vocoder amplifies ~500× and would clip almost every sample at ±1, hiding differences;
# the tests scale its last (linear, bias-free) conv so the waveform sits around 0.1 RMS.
TAME = 0.008


@pytest.fixture(scope="module", autouse=True)
def no_autograd():
    """The modules are plain (trainable) forwards; these inference tests need no gradients."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def ours(tiny25):
    model = thinktalk.load(tiny25)
    with torch.no_grad():
        model.token2wav.code2wav_bigvgan_model.conv_post.weight.mul_(TAME)
    return model


@pytest.fixture(scope="module")
def voice(tiny25):
    return load_speakers(tiny25)["Ethan"]


def snr_db(reference: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - x).pow(2).sum().clamp_min(1e-30)))


def stream(t2w: Token2Wav, codes, voice, noise, steps, options=None, piece=1):
    """Feed codes ``piece`` at a time; return the concatenated audio, the audio pieces and the stream state."""
    st = t2w.stream_start(voice["cond"], voice["ref_mel"], steps, 0.5, noise, options=options)
    pieces = [t2w.stream_push(st, codes[:, i : i + piece]) for i in range(0, codes.shape[1], piece)]
    pieces.append(t2w.stream_push(st, None, final=True))
    return torch.cat(pieces), [p for p in pieces if p.numel()], st


@pytest.mark.parametrize("guidance", [0.5, 0.0])
def test_mel_and_waveform_match_reference(tiny25, ours, voice, guidance):
    from transformers import Qwen2_5OmniForConditionalGeneration

    ref = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tiny25)).eval()
    with torch.no_grad():
        ref.token2wav.code2wav_bigvgan_model.conv_post.weight.mul_(TAME)
    codes = torch.randint(0, 8448, (1, 30), generator=torch.Generator().manual_seed(1))
    cond, ref_mel = voice["cond"], voice["ref_mel"]
    torch.manual_seed(7)  # the reference draws its ODE noise with torch.randn([B, frames, mel]) first
    with torch.no_grad():
        mel_ref = ref.token2wav.code2wav_dit_model.sample(cond, ref_mel, codes, num_steps=3, guidance_scale=guidance)
        wav_ref = ref.token2wav.code2wav_bigvgan_model(mel_ref)
    torch.manual_seed(7)
    noise = torch.randn(1, 60, 80)
    t2w = ours.token2wav
    mel = t2w.mel(codes, cond, ref_mel, num_steps=3, guidance_scale=guidance, noise=noise)
    torch.testing.assert_close(mel, mel_ref, atol=1e-5, rtol=1e-5)
    wav = t2w(codes, cond, ref_mel, num_steps=3, guidance_scale=guidance, noise=noise)
    assert wav.shape == (1, 30 * 480)
    assert wav.abs().max() < 1  # nothing clipped: the comparison sees every sample
    torch.testing.assert_close(wav[0], wav_ref, atol=1e-5, rtol=1e-5)


def test_buffers_rebuilt_after_meta_loading(ours):
    t2w = ours.token2wav
    act = t2w.code2wav_bigvgan_model.resblocks[0].activations[0]
    torch.testing.assert_close(act.filter, kaiser_sinc_filter(0.25, 0.3, 12), atol=0, rtol=0)
    with torch.device("meta"):
        fresh = Token2Wav(t2w.cfg)
    materialize_buffers(fresh, "cpu")
    assert not any(b.is_meta for b in fresh.buffers())
    torch.testing.assert_close(fresh.code2wav_dit_model.inv_freq, t2w.code2wav_dit_model.inv_freq)


def test_codes_outside_the_codebook_are_rejected(ours, voice):
    with pytest.raises(ValueError, match="outside the DiT's codebook"):
        ours.token2wav(torch.tensor([[1, 9000]]), voice["cond"], voice["ref_mel"], num_steps=2)


def test_receptive_field_bounds_the_vocoder(ours):
    voc = ours.token2wav.code2wav_bigvgan_model
    rf, hop = receptive_field(voc.cfg), voc.hop_length
    assert receptive_field(BigVGANConfig()) == 36  # the published vocoder
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(1, 80, 160, generator=g) - 4
    base = ours.token2wav.vocode(mel)[0]
    bumped = mel.clone()
    bumped[:, :, 80] += 3
    changed = (ours.token2wav.vocode(bumped)[0] - base).abs() > 0
    where = changed.nonzero().flatten()
    # Frame 80 covers samples [80·hop, 81·hop); its influence must stay within rf frames on each side ...
    assert int(where.min()) >= (80 - rf) * hop and int(where.max()) < (81 + rf) * hop
    # ... and the bound is not loose by more than a third.
    assert int(where.min()) < (80 - 2 * rf // 3) * hop and int(where.max()) >= (81 + 2 * rf // 3) * hop


def test_vocoder_stream_is_exact(ours):
    """Stage 2: vocoding in pieces with receptive-field context == vocoding everything at once."""
    voc = ours.token2wav.code2wav_bigvgan_model
    rf = receptive_field(voc.cfg)
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(1, 80, 137, generator=g) - 4
    whole = ours.token2wav.vocode(mel)[0]

    def run(context, lookahead):
        st = VocoderStreamState(context=context, lookahead=lookahead, mel=mel[:, :, :0])
        cuts = [0, 5, 40, 41, 90, 137]
        out = [vocoder_stream_push(voc, st, mel[:, :, a:b], final=False) for a, b in zip(cuts[:-1], cuts[1:])]
        out.append(vocoder_stream_push(voc, st, None, final=True))
        return torch.cat(out)

    exact = run(rf, rf)
    assert exact.shape == whole.shape
    torch.testing.assert_close(exact, whole, atol=1e-5, rtol=0)
    # Without context the chunk edges show (the check above can fail).
    assert (run(0, 0) - whole).abs().max() > 1e-2


def test_stream_equals_offline_when_the_utterance_fits_one_window(ours, voice):
    t2w = ours.token2wav
    opts = StreamOptions()
    n = (opts.first_chunk_blocks + opts.future_blocks) * t2w.cfg.dit.block_size // 2 - 1  # just too short for a chunk
    codes = torch.randint(0, 8448, (1, n), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, 2 * n, 80, generator=torch.Generator().manual_seed(3))
    offline = t2w(codes, voice["cond"], voice["ref_mel"], num_steps=3, noise=noise)[0]
    streamed, pieces, st = stream(t2w, codes, voice, noise, steps=3)
    assert len(pieces) == 1 and st.dit.chunks == 1
    torch.testing.assert_close(streamed, offline, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def long_stream(ours, voice):
    """150 codes (3 s): offline vs streamed with the default options, codes arriving one by one."""
    t2w = ours.token2wav
    codes = torch.randint(0, 8448, (1, 150), generator=torch.Generator().manual_seed(4))
    noise = torch.randn(1, 300, 80, generator=torch.Generator().manual_seed(5))
    mel = t2w.mel(codes, voice["cond"], voice["ref_mel"], num_steps=4, noise=noise)
    offline = t2w.vocode(mel)[0]
    streamed, pieces, st = stream(t2w, codes, voice, noise, steps=4)
    return offline, streamed, pieces, st


def test_stream_stays_close_to_offline(long_stream):
    offline, streamed, pieces, st = long_stream
    assert streamed.shape == offline.shape
    assert len(pieces) >= 3 and len(st.dit.borders) >= 3  # it really streamed
    # Measured 65-74 dB on this model (seeds 0-2, 4 and 10 ODE steps); the bound leaves margin.
    assert snr_db(offline, streamed) > 50


def test_no_clicks_at_chunk_borders(long_stream, ours, voice):
    """Around every border (DiT chunks and audio pieces) the stream matches offline as well as anywhere:
    a click would be a transient the offline waveform does not have."""
    offline, streamed, pieces, st = long_stream
    hop = ours.token2wav.hop_length

    def border_snr(stream_audio, borders_samples):
        near = torch.zeros_like(offline, dtype=torch.bool)
        for b in borders_samples:
            near[max(0, b - hop) : b + hop] = True
        return snr_db(offline[near], stream_audio[near])

    audio_borders = torch.tensor([p.numel() for p in pieces]).cumsum(0)[:-1].tolist()
    dit_borders = [b * hop for b in st.dit.borders]
    assert border_snr(streamed, audio_borders) > 40
    assert border_snr(streamed, dit_borders) > 40
    # The same check catches a vocoder that cuts chunks without context.
    t2w = ours.token2wav
    codes = torch.randint(0, 8448, (1, 150), generator=torch.Generator().manual_seed(4))
    noise = torch.randn(1, 300, 80, generator=torch.Generator().manual_seed(5))
    naive, naive_pieces, _ = stream(t2w, codes, voice, noise, 4, StreamOptions(vocoder_context=0, vocoder_lookahead=0), 10)
    naive_borders = torch.tensor([p.numel() for p in naive_pieces]).cumsum(0)[:-1].tolist()
    assert border_snr(naive, naive_borders) < 20


def incremental(voc, mel, cuts, units=None):
    """Vocode ``mel`` [1, 80, T] incrementally, fed in the pieces between ``cuts``."""
    units = units or stream_units(voc)
    states = [UnitState() for _ in units]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        xs = [mel[0, :, a:b]]
        for u, unit in enumerate(units):
            xs = unit_push(unit, [states[u]], xs, [False])
        out.append(xs[0][0])
    xs = [None]
    for u, unit in enumerate(units):
        xs = unit_push(unit, [states[u]], xs, [True])
    out.append(xs[0][0])
    return torch.cat(out)


def test_incremental_vocoder_is_exact_and_reads_each_frame_about_once(ours):
    """The incremental vocoder: any pieces (down to one frame) give BigVGAN of the whole mel, and each piece of
    the network reads its inputs about once (the window vocoder re-reads 2·receptive-field frames per piece)."""
    voc = ours.token2wav.code2wav_bigvgan_model
    mel = torch.randn(1, 80, 137, generator=torch.Generator().manual_seed(1)) - 4
    whole = ours.token2wav.vocode(mel)[0]
    for cuts in ([0, 5, 40, 41, 90, 137], [*range(12), 60, 61, 137], [0, 137]):
        torch.testing.assert_close(incremental(voc, mel, cuts), whole, atol=1e-5, rtol=0)
    # Work: inputs read by every unit, streamed in 24-frame pieces, against the offline pass.
    read = []
    counted = [dataclasses.replace(u, fn=lambda x, f=u.fn: (read.append(x.shape[-1] * x.shape[1]), f(x))[1]) for u in stream_units(voc)]
    incremental(voc, mel, list(range(0, 137, 24)) + [137], counted)
    streamed_reads = sum(read)
    read.clear()
    incremental(voc, mel, [0, 137], counted)
    print(f"incremental vocoder reads {streamed_reads / sum(read):.2f}x the offline pass")
    assert streamed_reads < 1.4 * sum(read)  # measured 1.13× (tiny vocoder, 24-frame pieces)
    # A unit that ignored its reach would show its cuts (the exactness check above can fail).
    blind = [dataclasses.replace(u, halo=0) for u in stream_units(voc)]
    assert (incremental(voc, mel, [0, 5, 40, 41, 90, 137], blind) - whole).abs().max() > 1e-3


def test_streams_pushed_together_equal_each_alone(ours, voice):
    """Token2Wav.stream_push_many (DiT windows and vocoder pieces batched across utterances) == stream_push
    of each utterance alone, with utterances of different lengths out of step."""
    t2w = ours.token2wav
    lengths, offsets = [50, 56, 40], [0, 0, 12]  # the third starts a block late: its windows sit elsewhere
    opts = StreamOptions(first_chunk_blocks=1, chunk_blocks=1, past_blocks=1, future_blocks=1)  # a window per block
    g = torch.Generator().manual_seed(7)
    codes = [torch.randint(0, 8448, (1, n), generator=g) for n in lengths]
    noises = [torch.randn(1, 2 * n, 80, generator=g) for n in lengths]

    def run(together: bool):
        states = [t2w.stream_start(voice["cond"], voice["ref_mel"], 2, 0.5, nz, options=opts) for nz in noises]
        audio = [[] for _ in states]
        for step in range(max(n + o for n, o in zip(lengths, offsets)) + 1):
            items = []
            for i, (c, o, n) in enumerate(zip(codes, offsets, lengths)):
                j = step - o
                if 0 <= j <= n and not states[i].dit.finished:
                    items.append((i, None if j == n else c[:, j : j + 1], j == n))
            if together:
                outs = t2w.stream_push_many([states[i] for i, _, _ in items], [c for _, c, _ in items], [f for _, _, f in items])
            else:
                outs = [t2w.stream_push(states[i], c, final=f) for i, c, f in items]
            for (i, _, _), a in zip(items, outs):
                audio[i].append(a)
        return [torch.cat(a) for a in audio], states

    batches = []
    solve = token2wav.solve
    token2wav.solve = lambda dit, noise, *a, **k: (batches.append(noise.shape[0]), solve(dit, noise, *a, **k))[1]
    try:
        together, states = run(True)
    finally:
        token2wav.solve = solve
    assert max(batches) == 3  # all three windows in one solve, the late one at its own place
    alone, _ = run(False)
    for a, b, n in zip(together, alone, lengths):
        assert a.shape == b.shape == (n * 480,)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert all(st.dit.chunks >= 3 for st in states)


def test_vocoder_with_fused_activations_equals_the_convolutions(ours, monkeypatch):
    """BigVGAN with every activation in its fused form (shifted sums: what compile_speech compiles), run eagerly
    == BigVGAN with the transposed/strided convolutions (the default path), the signal's edges included."""
    from thinktalk.models.qwen2_5_omni.bigvgan import AntiAliasedSnake

    voc = ours.token2wav.code2wav_bigvgan_model
    mel = torch.randn(2, 80, 37, generator=torch.Generator().manual_seed(8)) - 4
    with torch.inference_mode():
        plain = voc(mel)
        monkeypatch.setattr(AntiAliasedSnake, "forward", AntiAliasedSnake.fused)
        fast = voc(mel)
        shorter = voc(mel[:, :, :36])
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert not torch.equal(shorter, fast[:, : 36 * 240])  # the check sees the signal's edges


@pytest.mark.parametrize("length", [1, 2, 13, 200])
def test_fused_antialiased_activation_equals_the_convolutions(length):
    """AntiAliasedSnake.fused (shifted sums: the form compile_speech compiles) == its convolutions, edges included,
    run eagerly here (tests/test_compiled.py runs it compiled)."""
    from thinktalk.models.qwen2_5_omni.bigvgan import AntiAliasedSnake

    g = torch.Generator().manual_seed(length)
    for channels in (1, 3, 24):
        act = AntiAliasedSnake(channels)
        with torch.no_grad():
            act.act.alpha.normal_(0, 0.5, generator=g)
            act.act.beta.normal_(0, 0.5, generator=g)
        x = torch.randn(2, channels, length, generator=g) * 2
        with torch.inference_mode():
            plain, fused = act(x), act.fused(x)
        assert fused.shape == plain.shape == x.shape
        torch.testing.assert_close(fused, plain, atol=5e-6, rtol=0)
        assert plain.abs().max() > 0.5


@pytest.mark.parametrize("batch", [1, 3])
def test_narrow_convolutions_as_matmuls_equal_the_convolutions(batch):
    """conv1d_as_matmuls (the fast path's narrow BigVGAN convolutions: one matrix product per tap) == F.conv1d,
    dilations, kernel sizes, bias or none, edges included."""
    from thinktalk.models.qwen2_5_omni.bigvgan import conv1d_as_matmuls

    g = torch.Generator().manual_seed(batch)
    for cin, cout, k, d, bias in ((2, 2, 3, 1, True), (4, 4, 7, 5, True), (8, 8, 3, 3, True), (2, 1, 7, 1, False)):
        conv = torch.nn.Conv1d(cin, cout, k, 1, dilation=d, padding=(k * d - d) // 2, bias=bias)
        with torch.no_grad():
            conv.weight.normal_(0, 1, generator=g)
        x = torch.randn(batch, cin, 37, generator=g)
        with torch.inference_mode():
            plain, fast = conv(x), conv1d_as_matmuls(conv, x)
        assert fast.shape == plain.shape
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="stride 1"):
        conv1d_as_matmuls(torch.nn.Conv1d(2, 2, 3, stride=2), torch.zeros(1, 2, 9))


def test_block_local_attention_equals_the_masked_one(ours, voice):
    """The DiT's block-by-block attention == full attention under the block mask (the plain path), whole
    utterances and windows at several places (per-row starts), past the length where it takes over."""
    from thinktalk.models.qwen2_5_omni.dit import DiT, solve

    dit = ours.token2wav.code2wav_dit_model
    bs = dit.cfg.block_size
    frames = DiT.BLOCK_LOCAL_FROM * bs + 10  # a partial last block
    g = torch.Generator().manual_seed(10)
    noise = torch.randn(2, frames, 80, generator=g)
    codes = torch.randint(0, 8448, (2, frames // 2), generator=g)
    cond, ref = voice["cond"].reshape(1, -1).expand(2, -1), voice["ref_mel"].reshape(1, -1, 80).expand(2, -1, -1)
    for start in (0, torch.tensor([0, 2 * bs])):
        runs = {}
        for local in (True, False):
            DiT.block_local = local
            try:
                runs[local] = solve(dit, noise, codes, cond, ref, 2, 0.5, start=start)
            finally:
                DiT.block_local = True
        torch.testing.assert_close(runs[True], runs[False], atol=1e-5, rtol=0)


def test_a_bad_utterance_pushed_together_changes_no_other(ours, voice):
    """stream_push_many checks every utterance's codes before it changes any state: a bad one raises (naming the
    ids) and leaves the others as they were, so the engine can run them again one by one."""
    t2w = ours.token2wav
    states = [t2w.stream_start(voice["cond"], voice["ref_mel"], 2, 0.5) for _ in range(2)]
    with pytest.raises(ValueError, match="9000"):
        t2w.stream_push_many(states, [torch.tensor([[5, 6]]), torch.tensor([[7, 9000]])], [False, False])
    assert all(st.dit.codes.shape[1] == 0 and not st.dit.finished for st in states)
