"""scoresde: score-based diffusion models where the DDPM chain and the VP-SDE are one object."""
from . import analytic, evaluate, grids, guidance, likelihood, metrics, nn, paths, prediction, schedules
from .analytic import Gaussian, GaussianMixture
from .grids import GRIDS, TunedGrid
from .guidance import (ClassifierFreeGuidance, ClassifierGuidance, Inpaint, X0Correction, dynamic_threshold,
                       static_threshold)
from .likelihood import log_likelihood
from .prediction import Denoiser, Prediction, PredictionModel
from .pretrained import load_model
from .diffusers_io import load_diffusers
from .sde import VPSDE
from .solvers import SOLVERS, BrownianNoise, GaussianNoise, SampleInfo, sample
from .chunked import ChunkedRun, load_samples, sample_to_disk  # noqa: E402 (after solvers)
from .tuning import tune_grid  # noqa: E402 (after solvers)
from . import cascade  # noqa: E402 (after solvers)

__version__ = "0.1.0"

__all__ = [
    "VPSDE", "Denoiser", "Prediction", "PredictionModel", "sample", "SOLVERS", "GRIDS", "SampleInfo", "GaussianNoise", "BrownianNoise",
    "Gaussian", "GaussianMixture", "analytic", "evaluate", "grids", "metrics", "nn", "paths", "prediction", "schedules", "load_model",
    "likelihood", "log_likelihood", "guidance", "ClassifierFreeGuidance", "ClassifierGuidance", "Inpaint",
    "X0Correction", "dynamic_threshold", "static_threshold",
    "sample_to_disk", "load_samples", "ChunkedRun", "tune_grid", "TunedGrid", "load_diffusers",
    "cascade",
]
