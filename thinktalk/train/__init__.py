"""Training: ``thinktalk train CONFIG.yaml [key=value ...]`` — one trainer, every recipe (docs/training.md).

    from thinktalk.train import load_config, train
    result = train(load_config("recipes/sft.yaml", ["model=/models/Qwen2.5-Omni-3B", "max_steps=10"]))
"""

from thinktalk.train.config import LoadedConfig, TrainConfig, TrainConfigError, load_config


def train(loaded: LoadedConfig):
    """Run a loaded config (see :func:`thinktalk.train.trainer.train`)."""
    from thinktalk.train.trainer import train as run

    return run(loaded)


__all__ = ["LoadedConfig", "TrainConfig", "TrainConfigError", "load_config", "train"]
