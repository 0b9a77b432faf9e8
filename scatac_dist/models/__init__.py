"""The published methods, as classes that read a store and write their outputs into it.

``SCCASE`` (scCASE / scCASER, similarity-enhanced NMF), ``SCALE`` (VAE with a GMM prior),
``SCEMBED`` (scEmbed, word2vec over regions). Each class is in the module named after its
method (``sccase.py``, ``scale.py``, ``scembed.py``); its parts (input, training, output
passes) are in the modules that start with that name. The methods themselves, with their
defaults and measurements, are described in ``docs/methods/``.
"""

from .scale import SCALE
from .sccase import SCCASE
from .scembed import SCEMBED

__all__ = ["SCALE", "SCCASE", "SCEMBED"]
