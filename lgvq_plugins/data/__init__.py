"""Data sets: the procedural ``shapes`` set and the resumable sampler."""
