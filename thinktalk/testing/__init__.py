"""Helpers for tests and demos: tiny checkpoints and their tokenizer files."""
