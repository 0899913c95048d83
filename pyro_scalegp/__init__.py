"""scalegp for Pyro: scalable Gaussian-process components on torch."""
from scalegp import Experts, balanced_tree, partition

from .advgp import ADVGP, ADVGPGuide
from .async_svi import AsyncProximalSVI, distributed_proximal_svi
from .hgp import HGPMarginal, JitterWarning, NotPositiveDefiniteError, expert_log_likelihood, gaussian_log_likelihood
from .kernels import BoundKernel, bind
from .lattice import LatticeKernelOperator, SimplexGPMarginal
from . import mcmc  # noqa: F401  (registers mcmc.reject_step with Pyro's HMC and NUTS)
from .optim import ProximalAdadelta, ProximalAdadeltaOptimizer
from .svgp_vae import SVGPVAE, ExactGPVAE, SVGPVAEGuide

__all__ = [
    "Experts", "balanced_tree", "partition",
    "HGPMarginal", "JitterWarning", "NotPositiveDefiniteError", "expert_log_likelihood", "gaussian_log_likelihood",
    "BoundKernel", "bind",
    "ADVGP", "ADVGPGuide", "AsyncProximalSVI", "distributed_proximal_svi",
    "ProximalAdadelta", "ProximalAdadeltaOptimizer",
    "LatticeKernelOperator", "SimplexGPMarginal",
    "SVGPVAE", "ExactGPVAE", "SVGPVAEGuide",
]
