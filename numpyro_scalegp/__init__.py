"""scalegp for NumPyro: scalable Gaussian-process components on JAX."""
from scalegp import Experts, balanced_tree, partition

from . import kernels
from .hgp import (
    HGPMarginal, JitterWarning, NotPositiveDefiniteError, NotPositiveDefiniteWarning, expert_log_likelihood,
    gaussian_log_likelihood,
)
from .svgp_vae import SVGPVAE, ExactGPVAE, SVGPVAEGuide
from .advgp import ADVGP, ADVGPGuide
from .optim import proximal_adadelta

__all__ = [
    "Experts", "balanced_tree", "partition", "kernels",
    "HGPMarginal", "JitterWarning", "NotPositiveDefiniteError", "NotPositiveDefiniteWarning",
    "expert_log_likelihood", "gaussian_log_likelihood",
]
from .lattice import LatticeKernelOperator  # noqa: E402  (issue 3)
