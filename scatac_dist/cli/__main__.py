"""``python -m scatac_dist.cli``: the ``scatac-dist`` command without its console script."""

from . import main

main()
