"""bnexplore: why PyTorch and Keras BatchNorm layers give different numbers.

``bnexplore.run(link)`` runs the scenario a link describes for real in each
framework and returns the document the app and the CLI show.
``bnexplore.store_file(path)`` keeps a BatchNorm state (or a batch) in the store and
returns its digest, for ``state=`` (or ``file=``) in a link.
"""

from bnexplore.runner import compare, run
from bnexplore.scenario import Scenario, parse_link
from bnexplore.store import store_file
from bnexplore.sweep import sweep_link as sweep_run

__all__ = ["Scenario", "compare", "parse_link", "run", "store_file", "sweep_run"]
