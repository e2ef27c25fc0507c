"""Distillation losses as stateless functions: batch-mean, KL(teacher || student) x T^2, on logits.

These names and signatures are the public API of ``mentor.distill.losses``.
"""

from .contrastive import *  # noqa: F401,F403
from .crosslayer import *  # noqa: F401,F403
from .distribution import *  # noqa: F401,F403
from .feature import *  # noqa: F401,F403
from .logit import *  # noqa: F401,F403
from .margin import *  # noqa: F401,F403
from .multi import *  # noqa: F401,F403
from .online import *  # noqa: F401,F403
from .review import *  # noqa: F401,F403
from .svd import *  # noqa: F401,F403
