"""Training machinery: losses, augmentation, checkpoints and logs, data parallelism."""
