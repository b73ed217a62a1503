"""Frozen text encoders (open_clip, Hugging Face, MiniLM) and the text-feature cache."""
