"""thinktalk-tiny's own data: shapes, videos, espeak-ng speech, arithmetic; its tokenizer and model config.

``python -m thinktalk.data --out DIR --seed 0 --n-train 2000 --n-test 210`` writes the data set
(:mod:`thinktalk.data.generate`); :mod:`thinktalk.data.tokenizer` trains the BPE tokenizer on it and
:mod:`thinktalk.data.model` builds the tiny Qwen3-Omni checkpoint directory. See docs/tiny-model.md.
"""

from thinktalk.data.generate import generate

__all__ = ["generate"]
