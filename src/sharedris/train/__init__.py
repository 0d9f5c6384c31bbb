"""Training: `sharedris train` in one process or under torchrun (DDP)."""
