"""scalegp for NumPyro: scalable Gaussian-process components on JAX."""
from scalegp import Experts, balanced_tree, partition

from . import kernels
from .advgp import ADVGP, ADVGPGuide
from .async_svi import AsyncProximalSVI, distributed_proximal_svi
from .hgp import (
    HGPMarginal, JitterWarning, NotPositiveDefiniteError, NotPositiveDefiniteWarning, expert_log_likelihood,
    gaussian_log_likelihood,
)
from .lattice import LatticeKernelOperator, SimplexGPMarginal
from .optim import proximal_adadelta
from .svgp_vae import SVGPVAE, ExactGPVAE, SVGPVAEGuide

__all__ = [
    "Experts", "balanced_tree", "partition", "kernels",
    "HGPMarginal", "JitterWarning", "NotPositiveDefiniteError", "NotPositiveDefiniteWarning",
    "expert_log_likelihood", "gaussian_log_likelihood",
    "ADVGP", "ADVGPGuide", "AsyncProximalSVI", "distributed_proximal_svi", "proximal_adadelta",
    "LatticeKernelOperator", "SimplexGPMarginal",
    "SVGPVAE", "ExactGPVAE", "SVGPVAEGuide",
]
