"""Diffusion sampling and sampler distillation: the denoiser protocol, schedules, ODE solvers, AMED,
GITS, SFD, EDM training of a small U-Net, and sample-quality metrics.

Importing this package registers the ``edm_unet`` model and the ``edm`` training method; the ``amed`` method
and its ``amed_predictor`` model (:mod:`mentor.diffusion.amed_method`) register when first named.
"""

from .adapters import (
    CFGDenoiser,
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    VPDenoiser,
    cfg_denoiser,
    diffusers_denoiser,
    diffusers_schedule,
    load_diffusers,
)
from .amed import (
    AMEDPredictor,
    FeatureHook,
    InputFeature,
    amed_intermediate,
    amed_plugin,
    amed_sample,
    amed_solve,
    amed_solver,
    load_predictor,
    save_predictor,
    train_amed,
)
from .denoisers import Denoiser, EDMPrecond, EmpiricalDenoiser, GaussianDenoiser, as_sigma
from .edm import EDM, load_edm, to_images
from .geometry import (
    DeviationStats,
    Geometry,
    MeanShiftProfile,
    TrajectoryPCA,
    boomerang_coordinates,
    denoised_outputs,
    denoising_cosines,
    deviation_stats,
    effective_count,
    mean_shift_log_weights,
    mean_shift_profile,
    mean_shift_weights,
    perplexity,
    trajectory_geometry,
    trajectory_pca,
)
from .gits import GITSResult, gits_schedule
from .metrics import ClassifierFeatures, fd_score, frechet_distance, gaussian_stats, kid, rmse
from .sample import sample_images, sample_to_png, steps_for_nfe
from .samplers import (
    SAMPLERS,
    STOCHASTIC,
    History,
    Intermediate,
    Trajectory,
    deis,
    dpm_solver_2,
    dpm_solver_pp,
    dpm_solver_pp_2m_sde,
    edm_stochastic,
    euler,
    euler_ancestral,
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
    "AMEDPredictor", "CFGDenoiser", "ClassifierFeatures", "ContinuousVPSchedule", "Denoiser", "DiscreteVPSchedule",
    "EDM", "EDMPrecond", "EDMUNet", "EmpiricalDenoiser", "FeatureHook", "GITSResult", "GaussianDenoiser",
    "InputFeature", "SAMPLERS", "SCHEDULES", "StepConditioned", "Trajectory", "VPDenoiser", "amed_plugin",
    "amed_sample", "amed_solver", "as_sigma", "cfg_denoiser", "deis", "diffusers_denoiser", "diffusers_schedule",
    "dpm_solver_2", "dpm_solver_pp", "euler", "fd_score", "frechet_distance", "gaussian_stats", "get_schedule",
    "gits_schedule", "heun", "ipndm", "ipndm_v", "kid", "load_diffusers", "load_edm", "load_predictor", "load_student",
    "logsnr", "nfe", "polynomial", "rmse", "sample_images", "sample_to_png", "save_predictor", "save_student",
    "sfd_distill", "sfd_sample", "steps_for_nfe", "time_uniform", "to_images", "train_amed", "unipc",
    # trajectory geometry (mentor.diffusion.geometry)
    "DeviationStats", "Geometry", "MeanShiftProfile", "TrajectoryPCA", "boomerang_coordinates", "denoised_outputs",
    "denoising_cosines", "deviation_stats", "effective_count", "mean_shift_log_weights", "mean_shift_profile",
    "mean_shift_weights", "perplexity", "trajectory_geometry", "trajectory_pca",
    # stochastic samplers (mentor.diffusion.samplers)
    "STOCHASTIC", "dpm_solver_pp_2m_sde", "edm_stochastic", "euler_ancestral",
    # AMED's per-step data for the solvers (mentor.diffusion.samplers, mentor.diffusion.amed)
    "History", "Intermediate", "amed_intermediate", "amed_solve",
]
