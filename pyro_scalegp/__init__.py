"""scalegp for Pyro: scalable Gaussian-process components on torch."""
from scalegp import Experts, balanced_tree, partition

from .hgp import HGPMarginal, NotPositiveDefiniteError, expert_log_likelihood, gaussian_log_likelihood
from .kernels import BoundKernel, bind
from .svgp_vae import SVGPVAE, ExactGPVAE, SVGPVAEGuide
from .advgp import ADVGP, ADVGPGuide
from .async_svi import AsyncProximalSVI, distributed_proximal_svi
from .optim import ProximalAdadelta, ProximalAdadeltaOptimizer

__all__ = [
    "Experts", "balanced_tree", "partition",
    "HGPMarginal", "NotPositiveDefiniteError", "expert_log_likelihood", "gaussian_log_likelihood",
    "BoundKernel", "bind",
]
from .lattice import LatticeKernelOperator, SimplexGPMarginal  # noqa: E402  (issue 3)
