"""Training: the trainer, checkpoints, the experiment runner, distributed helpers and logs."""
