"""Training runs: the trainer, checkpoints, data-parallel training and the datasets."""
