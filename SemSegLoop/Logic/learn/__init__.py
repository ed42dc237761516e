"""Training: networks and presets, losses, patch sampling, the training loop, the teacher and its
features, checkpoints, and `round` that runs one whole training round on arrays."""
