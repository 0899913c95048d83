"""scalegp for NumPyro: scalable Gaussian-process components on JAX.

The names below load their module on first use (``numpyro_scalegp.ADVGP`` imports
:mod:`numpyro_scalegp.advgp`, and NumPyro with it): a process that needs one module, as the
ADVGP workers' fork server (:mod:`numpyro_scalegp.worker`), does not import the others.
"""
from importlib import import_module as _import_module

from scalegp import Experts, balanced_tree, partition

_MODULES = {
    "kernels": ["kernels"],
    "advgp": ["ADVGP", "ADVGPGuide"],
    "async_svi": ["AsyncProximalSVI", "distributed_proximal_svi"],
    "hgp": ["HGPMarginal", "JitterWarning", "NotPositiveDefiniteError", "NotPositiveDefiniteWarning",
            "expert_log_likelihood", "gaussian_log_likelihood"],
    "lattice": ["LatticeKernelOperator", "SimplexGPMarginal"],
    "optim": ["proximal_adadelta"],
    "svgp_vae": ["SVGPVAE", "ExactGPVAE", "SVGPVAEGuide"],
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}

__all__ = ["Experts", "balanced_tree", "partition", *_MODULE_OF]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'numpyro_scalegp' has no attribute {name!r}")
    loaded = _import_module(f"{__name__}.{module}")
    value = loaded if name == module else getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
