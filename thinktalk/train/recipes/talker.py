"""Talker recipes: multimodal-to-speech training (``talker``), preference optimisation (``dpo``) and a new
voice (``speaker``). The Thinker is frozen in all three: its hidden states are computed once per batch
without gradients, and the Talker is teacher-forced on the sequence it reads at inference
(:mod:`thinktalk.train.speech`).

* ``talker``: cross-entropy of the row's codec ids. Qwen2.5-Omni: the Talker's codes (then codec eos).
  Qwen3-Omni: codebook 0 by the Talker (then codec eos) and codebooks 1..15 by the code predictor, both
  trained (``train_code_predictor: false`` keeps the predictor fixed).
* ``dpo``: Direct Preference Optimization (Rafailov et al., 2023) on a ``chosen`` and a ``rejected`` code
  sequence for the same prompt and answer, with the frozen base Talker as reference:
  loss = -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]), log π summed over every code
  of the sequence (all codebooks). Logged: ``reward_chosen`` = β (log π(c) - log π_ref(c)),
  ``reward_rejected``, ``margin`` (their difference) and ``accuracy`` (margin > 0).
* ``speaker``: a new voice under a new name. The voice is one new conditioning vector: Qwen2.5-Omni's
  speaker text-bos token (a new Thinker token id, whose embedding row is learned) and Qwen3-Omni's speaker
  codec token (a new row of the Talker's codec embedding). It trains with the Talker on the voice's
  codes (``train_talker: false``: the vector alone, the Talker untouched). The exported checkpoint lists the voice in the
  official place: Qwen2.5 ``spk_dict.pt`` (its ``bos_token``, a ``ref_mel`` from a recording of the voice
  and a DiT ``cond`` vector), Qwen3 ``config.json`` ``talker_config.speaker_id``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinktalk.train import speech
from thinktalk.train.data import Batch
from thinktalk.train.recipes.base import LossOutput, Recipe, StepInfo


@dataclass
class TalkerOptions:
    speaker: str = ""  # the voice the codes are spoken in ("" = the checkpoint's default voice)
    codec_model: str = ""  # Qwen3: a Mimi checkpoint or a thinktalk.codec codec, for rows giving audio
    train_code_predictor: bool = True  # Qwen3: the code predictor trains with the Talker
    speech_key: str = "speech"  # Qwen3: the row field naming the answer's audio file (e.g. answer_audio)


class TalkerTraining(Recipe):
    name = "talker"
    Options = TalkerOptions
    components = ("talker",)
    load_components = ("thinker", "talker")
    code_keys: tuple[str, ...] = ("codes",)

    def setup(self) -> None:
        if self.cfg.packing:
            raise ValueError(f"{self.name}: packing does not apply (one Talker sequence per row)")
        if self.cfg.trainable:
            raise ValueError(f"{self.name} trains the Talker: 'trainable' (Thinker parts) does not apply")
        self.codes = speech.CodeSource(self.model, self.options.codec_model, self.options.speech_key)
        self.layers = tuple(self.model.talker_reads)
        self.speaker_token = self.speaker_token_of(self.options.speaker or None)

    def speaker_token_of(self, name: str | None) -> int:
        """Qwen2.5: the voice's text-bos token; Qwen3: its speaker codec token."""
        if self.family == "qwen2_5_omni":
            from thinktalk.models.qwen2_5_omni.speakers import speaker_params

            return int(speaker_params(self.model.speakers, name, self.cfg.model)[1]["bos_token"])
        return int(self.model.speaker_id(name))

    def select_parameters(self):
        for p in self.model.parameters():
            p.requires_grad_(False)
        out = {}
        for n, p in self.model.talker.named_parameters():
            train = (
                self.family == "qwen2_5_omni"
                or self.options.train_code_predictor
                or not n.startswith("code_predictor.")
            )
            p.requires_grad_(train)
            if train:
                out[f"talker.{n}"] = p
        return out

    # -- data -----------------------------------------------------------------------------------------
    def encode(self, row):
        return speech.encode_speech_row(self, row, self.code_keys, self.codes)

    def prepare(self, batch: Batch, step: StepInfo) -> Batch:
        with self.ctx.generation():
            batch.extra["states"] = speech.thinker_states(
                self.model.thinker, batch, self.layers, self.cfg.use_audio_in_video
            )
        return batch

    def _targets(self, codes: torch.Tensor) -> int:
        n = codes.shape[0]
        if self.family == "qwen2_5_omni":
            return n + 1
        return n + 1 + (n * (codes.shape[1] - 1) if self.options.train_code_predictor else 0)

    def count(self, batch: Batch) -> float:
        return float(sum(self._targets(item[0].extra["speech"].codes["codes"]) for item in batch.items))

    # -- sequences ------------------------------------------------------------------------------------
    def sequences(
        self, talker, batch: Batch, key: str, speaker_token: int | None = None
    ) -> list[speech.TalkerSequence]:
        token = self.speaker_token if speaker_token is None else speaker_token
        out = []
        for i, item in enumerate(batch.items):
            ex = item[0]
            states = speech.row_states(batch.extra["states"], i, ex.length)
            codes = ex.extra["speech"].codes[key]
            if self.family == "qwen2_5_omni":
                out.append(speech.qwen25_sequence(talker, self.model.thinker.model.embed_tokens, ex, states, codes, token,
                                                  self.cfg.use_audio_in_video))  # fmt: skip
            else:
                out.append(speech.qwen3_sequence(self.model, talker, ex, states, codes, token))
        return out

    def loss(self, modules, batch: Batch) -> LossOutput:
        talker = modules.talker
        scores = speech.sequence_logprobs(self.model, talker, self.sequences(talker, batch, "codes"))
        codec = torch.cat(scores.codec)
        loss = -codec.sum()
        metrics = {"codec_loss": (float(-codec.sum().detach()), float(codec.numel())),
                   "frames": (float(codec.numel() - len(scores.codec)), 0.0)}  # fmt: skip
        if scores.predictor is not None:
            pred = torch.cat([p.flatten() for p in scores.predictor])
            metrics["predictor_loss"] = (float(-pred.sum().detach()), float(pred.numel()))
            if self.options.train_code_predictor:
                loss = loss - pred.sum()
        return LossOutput(loss, metrics)


# -- DPO ----------------------------------------------------------------------------------------------


@dataclass
class DPOOptions(TalkerOptions):
    beta: float = 0.1  # β: how far the Talker may move from the reference for a given preference


class TalkerDPO(TalkerTraining):
    name = "dpo"
    Options = DPOOptions
    code_keys = ("chosen", "rejected")

    def setup(self) -> None:
        super().setup()
        if self.options.beta <= 0:
            raise ValueError(f"dpo: beta must be > 0 (got {self.options.beta})")
        # The reference model: a frozen copy of the base Talker (made before any training step or resume).
        self.reference = copy.deepcopy(self.model.talker).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def count(self, batch: Batch) -> float:
        return float(len(batch.items))

    def prepare(self, batch: Batch, step: StepInfo) -> Batch:
        batch = super().prepare(batch, step)
        seqs = self.sequences(self.reference, batch, "chosen") + self.sequences(self.reference, batch, "rejected")
        batch.extra["reference"] = speech.sequence_logprobs(self.model, self.reference, seqs).totals().float()
        return batch

    def loss(self, modules, batch: Batch) -> LossOutput:
        talker = modules.talker
        n = len(batch.items)
        seqs = self.sequences(talker, batch, "chosen") + self.sequences(talker, batch, "rejected")
        policy = speech.sequence_logprobs(self.model, talker, seqs).totals()
        ratio = policy - batch.extra["reference"]
        beta = self.options.beta
        chosen, rejected = beta * ratio[:n], beta * ratio[n:]
        margin = chosen - rejected
        loss = -F.logsigmoid(margin).sum()
        d = lambda x: float(x.detach().sum())  # noqa: E731
        metrics = {
            "reward_chosen": (d(chosen), float(n)),
            "reward_rejected": (d(rejected), float(n)),
            "margin": (d(margin), float(n)),
            "accuracy": (d((margin > 0).float()), float(n)),
            "logp_chosen": (d(policy[:n]), float(n)),
            "logp_rejected": (d(policy[n:]), float(n)),
        }
        return LossOutput(loss, metrics)


# -- a new voice ----------------------------------------------------------------------------------------


@dataclass
class SpeakerOptions(TalkerOptions):
    speaker_name: str = ""  # the new voice's name (required): speaker="NAME" at inference
    init_from: str = ""  # the voice whose vector starts the new one ("" = the default voice)
    # fine-tune the Talker with the voice (false: only the voice vector trains — a soft prompt that leaves
    # the Talker, and so every other voice, bit for bit as it was, but moves a small Talker little)
    train_talker: bool = True
    # Qwen2.5: a recording of the voice for its reference mel ("" = the first row's 'speech' file)
    reference_audio: str = ""


class VoiceVector(torch.nn.Module):
    """The new voice's conditioning vector, spliced into an embedding table's output at one token id.

    A forward hook on the table replaces the rows of ``token`` (the table itself stays frozen), so only
    this vector trains; the final checkpoint writes it into the table's row ``token``.
    """

    def __init__(self, table: torch.nn.Embedding, token: int, init: torch.Tensor):
        super().__init__()
        self.token = token
        self.vector = torch.nn.Parameter(init.detach().clone().float().to(table.weight.dtype))
        table.register_module("new_voice", self)
        self.handle = table.register_forward_hook(self._splice)

    def _splice(self, module, args, output):
        ids = args[0]
        hit = ids == self.token
        if not bool(hit.any()):
            return output
        return torch.where(hit[..., None], self.vector.to(output.dtype), output)


class SpeakerTraining(TalkerTraining):
    name = "speaker"
    Options = SpeakerOptions
    # Qwen2.5's voice vector lives in the Thinker's embedding table (its text-bos token's row).
    components = ("thinker", "talker")

    def setup(self) -> None:
        o = self.options
        if not o.speaker_name.strip():
            raise ValueError("speaker: set speaker_name (the new voice's name, used as speaker=NAME at inference)")
        known = {k.lower() for k in self.model.speakers}
        if o.speaker_name.lower() in known:
            raise ValueError(
                f"speaker: the checkpoint already has a voice '{o.speaker_name}' (voices: {', '.join(sorted(self.model.speakers))})"
            )
        if o.speaker:
            raise ValueError(
                "speaker: the codes are spoken by the new voice; use init_from to choose its starting voice"
            )
        self.options.train_code_predictor = o.train_talker
        super().setup()
        init_token = self.speaker_token_of(o.init_from or None)
        if self.family == "qwen2_5_omni":
            table = self.model.thinker.model.embed_tokens
            self.new_token = self._free_thinker_token()
        else:
            table = self.model.talker.model.codec_embedding
            self.new_token = self._free_codec_token()
        self.table_name = (
            "thinker.model.embed_tokens" if self.family == "qwen2_5_omni" else "talker.model.codec_embedding"
        )
        self.voice = VoiceVector(table, self.new_token, table.weight[init_token])
        self.speaker_token = self.new_token
        self.init_token = init_token

    def _free_thinker_token(self) -> int:
        """An id of the Thinker's vocabulary that no text token and no voice uses (above the tokenizer's ids)."""
        used = {int(s["bos_token"]) for s in self.model.speakers.values()}
        first = max([len(self.processor.tokenizer), *(u + 1 for u in used)])
        vocab = self.model.thinker.model.embed_tokens.num_embeddings
        for t in range(first, vocab):
            if t not in used:
                return t
        raise ValueError("speaker: the Thinker's vocabulary has no unused token id left for a new voice")

    def _free_codec_token(self) -> int:
        """A control id of the Talker's codec vocabulary (the top 1024, never sampled) used by nothing else."""
        c = self.model.talker.cfg
        used = set(self.model.speakers.values()) | {c.codec_bos_id, c.codec_eos_token_id, c.codec_pad_id,
                                                   c.codec_nothink_id, c.codec_think_bos_id, c.codec_think_eos_id}  # fmt: skip
        for t in range(max(self.model.speakers.values(), default=c.codec_pad_id) + 1, c.text.vocab_size):
            if t not in used:
                return t
        raise ValueError("speaker: the Talker's codec vocabulary has no unused control id left for a new voice")

    def select_parameters(self):
        params = super().select_parameters() if self.options.train_talker else {}
        if not self.options.train_talker:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.voice.vector.requires_grad_(True)
        params[f"{self.table_name}.new_voice.vector"] = self.voice.vector
        return params

    def final_state(self, state):
        state = dict(state)
        vector = state.pop(f"{self.table_name}.new_voice.vector")
        weight = state[f"{self.table_name}.weight"].clone()
        weight[self.new_token] = vector.to(weight.dtype)
        state[f"{self.table_name}.weight"] = weight
        return state

    def after_export(self, output_dir: str) -> None:
        """The new voice in the official place of the exported checkpoint (written after the base's files)."""
        name = self.options.speaker_name
        if self.family == "qwen3_omni_moe":
            path = os.path.join(output_dir, "config.json")
            with open(path, encoding="utf-8") as fh:
                config = json.load(fh)
            # Both implementations look voices up by their lower-case name.
            config["talker_config"].setdefault("speaker_id", {})[name.lower()] = self.new_token
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2)
            return
        from thinktalk.models.qwen2_5_omni.speakers import SPEAKER_FILE

        path = os.path.join(output_dir, SPEAKER_FILE)
        data = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else {}
        base = self.model.speakers[next(k for k, v in self.model.speakers.items() if v["bos_token"] == self.init_token)]
        data[name] = {
            "bos_token": self.new_token,
            "cond": base["cond"].clone(),
            "ref_mel": self.reference_mel(base["ref_mel"]),
        }
        torch.save(data, path)

    def reference_mel(self, fallback: torch.Tensor) -> torch.Tensor:
        """[1, frames, mel] log-mel of a recording of the voice (Token2Wav's speaker-encoder input), at most 4 s."""
        path = self.options.reference_audio or self._first_recording()
        if not path:
            return fallback.clone()
        from thinktalk.processing.media import load_audio

        mel_dim = fallback.shape[-1]
        wav = torch.as_tensor(load_audio(path, target_rate=24000), dtype=torch.float32)
        return log_mel_24k(wav, mel_dim)[None, :400]

    def _first_recording(self) -> str:
        for path in self.cfg.data_paths:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        value = json.loads(line).get("speech")
                        if isinstance(value, str):
                            return (
                                value
                                if os.path.isabs(value)
                                else os.path.join(os.path.dirname(os.path.abspath(path)), value)
                            )
        return ""


def log_mel_24k(wav: torch.Tensor, mel_dim: int = 80) -> torch.Tensor:
    """[frames, mel_dim] natural-log mel (n_fft 1024, hop 240: 100 frames/s, 0 .. 12 kHz, floor 1e-5) of 24 kHz audio:
    the BigVGAN-style features of Token2Wav (silence sits near log(1e-5) ≈ -11.5)."""
    from thinktalk.processing.audio import mel_filter_bank

    window = torch.hann_window(1024)
    spec = torch.stft(F.pad(wav[None], (392, 392), mode="reflect")[0], 1024, 240, 1024, window, center=False,
                      return_complex=True).abs()  # fmt: skip
    fb = mel_filter_bank(513, mel_dim, 0.0, 12000.0, 24000)  # [513, mel_dim]
    mel = fb.T @ spec
    return torch.log(mel.clamp_min(1e-5)).T
