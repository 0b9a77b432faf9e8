"""PyTorch ``nn.Module``s only: encoders, decoders and priors, with no knowledge of stores.

A *module* computes (``inference``, ``generative``, ``loss``); a *model* in
:mod:`scatac_dist.models` knows the data, trains the module and writes results.
"""

from .scale import GMMPrior, MLPEncoder, SCALEModule
from .scmvp import SCMVPModule

__all__ = ["GMMPrior", "MLPEncoder", "SCALEModule", "SCMVPModule"]
