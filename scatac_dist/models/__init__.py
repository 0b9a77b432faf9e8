"""The published methods, as classes that read a store and write their outputs into it.

``SCCASE`` (scCASE / scCASER, similarity-enhanced NMF), ``SCALE`` (VAE with a GMM prior),
``SCEMBED`` (scEmbed, word2vec over regions).
"""

from .scale import SCALE
from .sccase import SCCASE
from .scembed import SCEMBED

__all__ = ["SCALE", "SCCASE", "SCEMBED"]
