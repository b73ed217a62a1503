"""Evaluation: metrics and codebook statistics."""
