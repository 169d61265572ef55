"""Data, checkpoints, the training loop, losses, evaluation and assembly shared by every script."""
