"""The published methods, as classes that read a store and write their outputs into it.

``SCCASE`` (scCASE / scCASER, similarity-enhanced NMF).
"""

from .scale import SCALE
from .sccase import SCCASE

__all__ = ["SCALE", "SCCASE"]
