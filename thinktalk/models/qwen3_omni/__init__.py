"""Qwen3-Omni (``model_type: qwen3_omni_moe``): Instruct, Thinking and Captioner checkpoints."""
