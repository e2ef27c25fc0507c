"""Data-free knowledge distillation: a student learns from a trained teacher on images synthesised from the
teacher alone (see :mod:`mentor.datafree.base`)."""

from .base import DataFreeConfig, DataFreeMethod, GenerativeConfig, GenerativeMethod, InversionConfig, InversionMethod
from .generators import ConditionalBatchNorm2d, Generator, dcgan_init
from .pool import SyntheticPool

__all__ = ["ConditionalBatchNorm2d", "DataFreeConfig", "DataFreeMethod", "GenerativeConfig", "GenerativeMethod",
           "Generator", "InversionConfig", "InversionMethod", "SyntheticPool", "dcgan_init"]
