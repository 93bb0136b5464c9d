"""thinktalk: the Qwen-Omni Thinker–Talker models in plain PyTorch.

    import thinktalk
    model = thinktalk.load(path, device="cuda", dtype=torch.bfloat16)
    proc = thinktalk.Processor.from_pretrained(path)
    inputs = proc(conversation)
    res = model.generate(**inputs, speaker="Chelsie", return_audio=True)
"""

from thinktalk.checkpoint import CheckpointError
from thinktalk.config import ConfigError
from thinktalk.loading import from_state_dict, load

__version__ = "0.1.0"


def __getattr__(name):
    # The processor pulls in PyAV/soundfile/Pillow; import it only when asked for.
    if name == "Processor":
        from thinktalk.processing import Processor

        return Processor
    if name == "compile_speech":
        from thinktalk.generation.compiled import compile_speech

        return compile_speech
    raise AttributeError(f"module 'thinktalk' has no attribute '{name}'")


__all__ = ["CheckpointError", "ConfigError", "Processor", "compile_speech", "from_state_dict", "load", "__version__"]
