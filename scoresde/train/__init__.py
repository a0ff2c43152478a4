"""Training: the denoising objective, the loop (one process or many), EMA, data sets (checkpoints: scoresde.checkpoint)."""
from .config import PRESETS, TrainConfig, apply_overrides, preset
from .data import DATASETS, Data, load_data
from .ema import EMA
from .loop import train
from .objective import Objective, diffusion_loss

__all__ = ["PRESETS", "TrainConfig", "apply_overrides", "preset", "DATASETS", "Data", "load_data", "EMA",
           "train", "Objective", "diffusion_loss"]
