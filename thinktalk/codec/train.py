"""Training the codec: ``train_codec(CodecTrainConfig(...))`` (recipe ``codec`` of ``thinktalk train``).

Each step draws a batch of random segments (:class:`~thinktalk.codec.data.SegmentSampler`), encodes,
quantizes (EMA codebook updates inside), decodes with Code2Wav, and minimises

    mel_weight · multi-scale mel L1 + stft_weight · multi-resolution STFT + commitment_weight · commitment
    [+ adversarial_weight · hinge + feature_matching_weight · feature matching, when adversarial_weight > 0]

with AdamW, linear warm-up then cosine decay to ``min_lr_ratio · lr``. The decoded waveform of T frames
has ``1920·T - 555`` samples (Code2Wav's trimmed transposed convolutions) and is compared with the first
that many input samples.

``output_dir`` receives:

* ``metrics.jsonl`` — one JSON object per logged step: ``step``, ``loss``, ``lr``, each loss term
  (``mel``, ``stft``, ``commitment``, and ``adversarial``/``feature_matching``/``discriminator`` when on),
  ``grad_norm``, ``perplexity`` (mean codebook perplexity of the batch), ``restarted_codes``,
  ``skipped_rows``, ``seconds``; with ``eval_every``, also ``eval_loss``/``eval_mel``/``eval_stft``/
  ``eval_commitment`` on fixed batches drawn apart from the training ones (a row ``{"step": 0, "eval_...": ...}``
  before training) and ``eval_code_gain`` (mel distance lost when decoding another segment's codes);
* ``checkpoint-STEP/`` — ``model.safetensors`` (codec incl. codebooks), ``optimizer.pt``, ``scheduler.pt``,
  the discriminator's three when adversarial, ``rng.pt`` (torch CPU/CUDA, Python, NumPy),
  ``trainer_state.json`` (step, data position, config); ``resume_from="latest"`` (or a path) continues
  one, replaying the identical loss sequence;
* ``codec/`` — the trained codec (:func:`thinktalk.codec.load_codec`), whose ``code2wav.*`` tensors are a
  Qwen3-Omni Code2Wav (:func:`thinktalk.codec.export_qwen3_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from thinktalk.codec.data import SegmentSampler, load_corpus
from thinktalk.codec.export import load_codec_state, save_codec
from thinktalk.codec.losses import (
    MultiResolutionSTFTLoss,
    MultiScaleMelLoss,
    MultiScaleSTFTDiscriminator,
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_hinge_loss,
)
from thinktalk.codec.model import Codec, CodecConfig
from thinktalk.config import ConfigError, read_config

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class CodecTrainConfig:
    """One codec training run. ``codec`` is the architecture (see :class:`~thinktalk.codec.model.CodecConfig`:
    ``code2wav_config``, ``encoder``, ``quantizer``); ``model`` optionally names a Qwen3-Omni checkpoint whose
    ``code2wav_config`` sets the decoder's shape (so the codec fits that model's Talker)."""

    output_dir: str
    data: str | list[str]
    codec: dict = field(default_factory=dict)
    model: str | None = None
    recipe: str = "codec"
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    segment_frames: int = 25  # frames per training segment (25 = 2 s); ``max_length`` is accepted as an alias
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.8, 0.99)
    weight_decay: float = 0.0
    grad_clip: float | None = 10.0
    mel_weight: float = 1.0
    stft_weight: float = 1.0
    commitment_weight: float = 0.25
    mel_windows: tuple[int, ...] = (256, 512, 1024, 2048)
    mel_bins: tuple[int, ...] = (32, 64, 128, 128)
    stft_resolutions: tuple[tuple[int, int, int], ...] = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))
    adversarial_weight: float = 0.0  # > 0 turns on the MS-STFT discriminator
    feature_matching_weight: float = 2.0  # used only with the discriminator
    adversarial_start_step: int = 0
    discriminator_channels: int = 16
    discriminator_lr: float | None = None  # default: lr
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # > 0: loss on eval_batches fixed batches (codebooks frozen) at step 0 and every eval_every steps
    eval_batches: int = 2
    save_every: int = 500  # 0: only the last step
    save_total_limit: int | None = None
    resume_from: str | None = None  # "latest" or a checkpoint directory
    skip_bad_rows: bool = False
    device: str = "auto"
    num_threads: int | None = None  # torch CPU threads during the run (restored after); tiny models run best on 1
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> CodecTrainConfig:
        """From a YAML/JSON dict (the keys of ``thinktalk train``); unknown keys are errors naming them."""
        d = dict(d)
        if "max_length" in d:
            if "segment_frames" in d:
                raise ConfigError(f"{where}: give segment_frames or its alias max_length, not both")
            d["segment_frames"] = d.pop("max_length")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown keys for recipe codec: {unknown}")
        for key in ("output_dir", "data"):
            if d.get(key) in (None, "", []):
                raise ConfigError(f"{where}.{key} is required")
        if d.get("recipe", "codec") != "codec":
            raise ConfigError(f"{where}.recipe is '{d['recipe']}', not 'codec'")
        for key in ("betas", "mel_windows", "mel_bins"):
            if key in d:
                d[key] = tuple(d[key])
        if "stft_resolutions" in d:
            d["stft_resolutions"] = tuple(tuple(r) for r in d["stft_resolutions"])
        cfg = cls(**d)
        for key in ("max_steps", "batch_size", "log_every", "segment_frames", "grad_accum"):
            value = getattr(cfg, key, 1)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{key} must be a whole number >= 1 (got {value!r})")
        for key in ("eval_every", "save_every"):
            if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 0:
                raise ConfigError(f"{where}.{key} must be a whole number >= 0 (got {getattr(cfg, key)!r})")
        cfg.codec_config()  # validate the architecture now, not after loading the data
        return cfg

    def codec_config(self) -> CodecConfig:
        spec = dict(self.codec)
        if self.model is not None:
            base = read_config(self.model)
            if base.get("model_type") != "qwen3_omni_moe" or not base.get("code2wav_config"):
                raise ConfigError(f"model '{self.model}' is not a Qwen3-Omni checkpoint with a code2wav_config")
            if "code2wav_config" in spec or "decoder" in spec:
                raise ConfigError("give the decoder shape either by codec.code2wav_config or by model, not both")
            spec["code2wav_config"] = base["code2wav_config"]
        return CodecConfig.from_dict(spec, where="codec")


@dataclass
class TrainResult:
    output_dir: str
    codec_dir: str
    steps: int
    metrics: list[dict]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``.
    Example: lr_factor(0, 0, 100, 0.1) = 1.0, lr_factor(50, 0, 100, 0.1) = 0.55, lr_factor(100, 0, 100, 0.1) = 0.1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _scheduler(opt: torch.optim.Optimizer, cfg: CodecTrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"key": np_state[0], "state": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))


def latest_checkpoint(output_dir: str) -> str | None:
    steps = [int(m.group(1)) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))] if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


class _Run:
    """The objects of one run (model, optimisers, schedulers, losses), saved and restored together."""

    def __init__(self, cfg: CodecTrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        self.codec = Codec(cfg.codec_config())
        self.codec.init_for_training()
        self.codec.to(device).train()
        params = [p for p in self.codec.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.sched = _scheduler(self.opt, cfg)
        sr = self.codec.cfg.sample_rate
        self.mel = MultiScaleMelLoss(sr, cfg.mel_windows, cfg.mel_bins).to(device)
        self.stft = MultiResolutionSTFTLoss(cfg.stft_resolutions).to(device)
        self.disc = self.d_opt = self.d_sched = None
        if cfg.adversarial_weight > 0:
            self.disc = MultiScaleSTFTDiscriminator(channels=cfg.discriminator_channels).to(device).train()
            self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.discriminator_lr or cfg.lr, betas=cfg.betas)
            self.d_sched = _scheduler(self.d_opt, cfg)

    def save(self, directory: str, step: int, data_position: int) -> None:
        tmp = directory + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.codec.sync_code_embedding()
        save_file({k: v.detach().contiguous().cpu() for k, v in self.codec.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
        torch.save(self.opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(self.sched.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if self.disc is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.disc.state_dict().items()},
                      os.path.join(tmp, "discriminator.safetensors"))
            torch.save(self.d_opt.state_dict(), os.path.join(tmp, "discriminator_optimizer.pt"))
            torch.save(self.d_sched.state_dict(), os.path.join(tmp, "discriminator_scheduler.pt"))
        torch.save(_rng_state(), os.path.join(tmp, "rng.pt"))
        state = {"step": step, "data_position": data_position, "config": dataclasses.asdict(self.cfg)}
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)  # a checkpoint directory is complete or absent

    def load(self, directory: str) -> dict:
        def torch_load(name: str):
            return torch.load(os.path.join(directory, name), map_location=self.device, weights_only=True)

        with open(os.path.join(directory, "trainer_state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
        load_codec_state(self.codec, os.path.join(directory, "model.safetensors"))
        self.opt.load_state_dict(torch_load("optimizer.pt"))
        self.sched.load_state_dict(torch_load("scheduler.pt"))
        has_disc = os.path.exists(os.path.join(directory, "discriminator.safetensors"))
        if has_disc != (self.disc is not None):
            raise ConfigError(f"checkpoint '{directory}' was saved {'with' if has_disc else 'without'} a discriminator; "
                              "this run's adversarial_weight says otherwise")
        if self.disc is not None:
            self.disc.load_state_dict(load_file(os.path.join(directory, "discriminator.safetensors")))
            self.d_opt.load_state_dict(torch_load("discriminator_optimizer.pt"))
            self.d_sched.load_state_dict(torch_load("discriminator_scheduler.pt"))
        _set_rng_state(torch.load(os.path.join(directory, "rng.pt"), map_location="cpu", weights_only=True))
        return state


@torch.no_grad()
def _evaluate(run: _Run, sampler: SegmentSampler, batches: int) -> dict:
    """Loss terms on fixed batches, codebooks frozen (eval mode), averaged; and ``eval_code_gain``: how much
    worse the mel distance gets when each segment is decoded from another segment's codes (0 = the decoder
    ignores its codes; the first phase of training, when it learns the average spectrum, looks like that)."""
    cfg, codec = run.cfg, run.codec
    codec.eval()
    sums: dict[str, float] = {}
    for i in range(batches):
        x = sampler.batch(i).to(run.device)
        out = codec(x)
        target = x[..., : out.audio.shape[-1]]
        terms = {"mel": run.mel(out.audio, target), "stft": run.stft(out.audio, target), "commitment": out.quantizer.commitment}
        terms["loss"] = cfg.mel_weight * terms["mel"] + cfg.stft_weight * terms["stft"] + cfg.commitment_weight * terms["commitment"]
        if x.shape[0] > 1:
            terms["code_gain"] = run.mel(codec.decode(out.codes.roll(1, 0)), target) - terms["mel"]
        for k, v in terms.items():
            sums[f"eval_{k}"] = sums.get(f"eval_{k}", 0.0) + float(v) / batches
    codec.train()
    return sums


def _log_row(metrics_path: str, row: dict) -> None:
    with open(metrics_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _truncate_metrics(metrics_path: str, step: int) -> list[dict]:
    """Keep the rows up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [r for r in rows if r.get("step", 0) <= step]
    with open(metrics_path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def _tensorboard(output_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(os.path.join(output_dir, "tensorboard"))


def train_codec(config: CodecTrainConfig) -> TrainResult:
    """Train (or resume) a codec as ``config`` says; see the module docstring for what is written."""
    if config.max_steps < 1 or config.batch_size < 1 or config.grad_accum < 1 or config.segment_frames < 1:
        raise ConfigError("max_steps, batch_size, grad_accum and segment_frames must be positive")
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: CodecTrainConfig) -> TrainResult:
    device = resolve_device(cfg.device)
    os.makedirs(cfg.output_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")

    run = _Run(cfg, device)
    spf = run.codec.samples_per_frame
    corpus = load_corpus(cfg.data, run.codec.cfg.sample_rate, cfg.skip_bad_rows)
    sampler = SegmentSampler(corpus, cfg.segment_frames * spf, cfg.batch_size, cfg.seed)
    with open(os.path.join(cfg.output_dir, "data.json"), "w", encoding="utf-8") as fh:
        json.dump({"files": len(corpus.paths), "seconds": round(corpus.seconds, 3), "shorter_than_segment": sampler.short,
                   "skipped": corpus.skipped}, fh, indent=2)

    eval_sampler = SegmentSampler(corpus, cfg.segment_frames * spf, cfg.batch_size, cfg.seed, salt=1)
    step, metrics = 0, []
    resume = latest_checkpoint(cfg.output_dir) if cfg.resume_from == "latest" else cfg.resume_from
    if cfg.resume_from == "latest" and resume is None:
        raise FileNotFoundError(f"resume_from=latest, but '{cfg.output_dir}' has no checkpoint-STEP directory")
    if resume is not None:
        state = run.load(resume)
        step = int(state["step"])
        if state["data_position"] != step * cfg.grad_accum:
            raise ConfigError(f"checkpoint '{resume}' was written with another grad_accum (data position {state['data_position']})")
        metrics = _truncate_metrics(metrics_path, step)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log

    if cfg.eval_every > 0 and step == 0:
        row = {"step": 0, **_evaluate(run, eval_sampler, cfg.eval_batches)}
        metrics.append(row)
        _log_row(metrics_path, row)
    writer = _tensorboard(cfg.output_dir)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="codec", unit="step")
    codec = run.codec
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = run.opt.param_groups[0]["lr"]
        adversarial = run.disc is not None and step >= cfg.adversarial_start_step
        sums: dict[str, float] = {}
        perplexity, restarted = 0.0, 0
        for micro in range(cfg.grad_accum):
            x = sampler.batch(step * cfg.grad_accum + micro).to(device)
            out = codec(x)
            y = out.audio
            target = x[..., : y.shape[-1]]
            terms = {"mel": run.mel(y, target), "stft": run.stft(y, target), "commitment": out.quantizer.commitment}
            loss = cfg.mel_weight * terms["mel"] + cfg.stft_weight * terms["stft"] + cfg.commitment_weight * terms["commitment"]
            if adversarial:
                real_logits, _ = run.disc(target)
                fake_logits, _ = run.disc(y.detach())
                d_loss = discriminator_hinge_loss(real_logits, fake_logits) / cfg.grad_accum
                d_loss.backward()
                terms["discriminator"] = d_loss.detach() * cfg.grad_accum
                for p in run.disc.parameters():
                    p.requires_grad_(False)
                fake_logits, fake_features = run.disc(y)
                with torch.no_grad():
                    _, real_features = run.disc(target)
                for p in run.disc.parameters():
                    p.requires_grad_(True)
                terms["adversarial"] = generator_hinge_loss(fake_logits)
                terms["feature_matching"] = feature_matching_loss(real_features, fake_features)
                loss = loss + cfg.adversarial_weight * terms["adversarial"] + cfg.feature_matching_weight * terms["feature_matching"]
            (loss / cfg.grad_accum).backward()
            terms["loss"] = loss.detach()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            perplexity += float(out.quantizer.perplexity.mean()) / cfg.grad_accum
            restarted += out.quantizer.restarted
        params = [p for p in codec.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        if adversarial:
            run.d_opt.step()
            run.d_sched.step()
            run.d_opt.zero_grad(set_to_none=True)
        step += 1
        evaluate = cfg.eval_every > 0 and step % cfg.eval_every == 0
        if step % cfg.log_every == 0 or step == cfg.max_steps or evaluate:
            row = {"step": step, "loss": sums.pop("loss"), "lr": lr, **sums, "grad_norm": float(grad_norm),
                   "perplexity": perplexity, "restarted_codes": restarted, "skipped_rows": len(corpus.skipped),
                   "seconds": round(time.perf_counter() - t0, 4)}
            if evaluate:
                row.update(_evaluate(run, eval_sampler, cfg.eval_batches))
            metrics.append(row)
            _log_row(metrics_path, row)
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"codec/{k}", v, step)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", mel=f"{row['mel']:.4f}")
        if bar is not None:
            bar.update(1)
        if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == cfg.max_steps:
            run.save(os.path.join(cfg.output_dir, f"checkpoint-{step}"), step, step * cfg.grad_accum)
            _prune(cfg.output_dir, cfg.save_total_limit)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    codec_dir = save_codec(codec, os.path.join(cfg.output_dir, "codec"))
    return TrainResult(cfg.output_dir, codec_dir, step, metrics)


def _prune(output_dir: str, limit: int | None) -> None:
    if not limit:
        return
    steps = sorted(int(m.group(1)) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name)))
    for s in steps[:-limit]:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{s}"), ignore_errors=True)
