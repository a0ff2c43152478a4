"""Training: the denoising objective, the loop (one process or many), EMA, checkpoints, data sets."""
