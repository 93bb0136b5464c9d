"""Processing: conversations (text, audio, images, video) -> the Thinker's input tensors.

``Processor.from_pretrained(checkpoint_dir)`` reads the tokenizer, chat template and preprocessor files
of an official checkpoint directory; ``proc(conversation)`` returns the reference's tensors
(``input_ids``, ``attention_mask``, ``input_features``, ``feature_attention_mask``, ``pixel_values``,
``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``video_second_per_grid``).
"""

from thinktalk.processing.audio import AudioFeatureConfig, AudioTooLongError, log_mel_spectrogram
from thinktalk.processing.image import VisionConfig, smart_resize
from thinktalk.processing.media import (
    AudioDecodeError,
    EmptyAudioError,
    ImageDecodeError,
    ImageTooLargeError,
    MediaError,
    VideoDecodeError,
    load_audio,
    load_image,
    load_video,
)
from thinktalk.processing.processor import Processor
from thinktalk.processing.tokenizer import ChatTemplate, Tokenizer

__all__ = [
    "Processor",
    "Tokenizer",
    "ChatTemplate",
    "AudioFeatureConfig",
    "VisionConfig",
    "smart_resize",
    "log_mel_spectrogram",
    "load_audio",
    "load_image",
    "load_video",
    "MediaError",
    "AudioDecodeError",
    "EmptyAudioError",
    "AudioTooLongError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "VideoDecodeError",
]
