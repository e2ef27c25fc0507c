"""Diffusion sampling and sampler distillation: the denoiser protocol, schedules, ODE solvers, AMED,
GITS, SFD, EDM training of a small U-Net, and sample-quality metrics.

Importing this package registers the ``edm_unet`` model and the ``edm`` training method.
"""

from .amed import (
    AMEDPredictor,
    FeatureHook,
    InputFeature,
    amed_plugin,
    amed_sample,
    amed_solver,
    load_predictor,
    save_predictor,
    train_amed,
)
from .denoisers import Denoiser, EDMPrecond, EmpiricalDenoiser, GaussianDenoiser, as_sigma
from .edm import EDM, load_edm, to_images
from .gits import GITSResult, gits_schedule
from .metrics import ClassifierFeatures, fd_score, frechet_distance, gaussian_stats, kid, rmse
from .sample import sample_images, sample_to_png, steps_for_nfe
from .samplers import (
    SAMPLERS,
    Trajectory,
    deis,
    dpm_solver_2,
    dpm_solver_pp,
    euler,
    heun,
    ipndm,
    ipndm_v,
    nfe,
    unipc,
)
from .schedules import SCHEDULES, get_schedule, logsnr, polynomial, time_uniform
from .sfd import StepConditioned, load_student, save_student, sfd_distill, sfd_sample
from .unet import EDMUNet

__all__ = [
    "AMEDPredictor", "ClassifierFeatures", "Denoiser", "EDM", "EDMPrecond", "EDMUNet", "EmpiricalDenoiser",
    "FeatureHook", "GITSResult", "GaussianDenoiser", "InputFeature", "SAMPLERS", "SCHEDULES", "StepConditioned",
    "Trajectory", "amed_plugin", "amed_sample", "amed_solver", "as_sigma", "deis", "dpm_solver_2", "dpm_solver_pp",
    "euler", "fd_score", "frechet_distance", "gaussian_stats", "get_schedule", "gits_schedule", "heun", "ipndm",
    "ipndm_v", "kid", "load_edm", "load_predictor", "load_student", "logsnr", "nfe", "polynomial", "rmse",
    "sample_images", "sample_to_png", "save_predictor", "save_student", "sfd_distill", "sfd_sample",
    "steps_for_nfe", "time_uniform", "to_images", "train_amed", "unipc",
]
