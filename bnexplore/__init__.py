"""bnexplore: why PyTorch and Keras BatchNorm layers give different numbers.

``bnexplore.run(link)`` runs the scenario a link describes for real in each
framework and returns the document the app and the CLI show.
"""

from bnexplore.runner import compare, run
from bnexplore.scenario import Scenario, parse_link
from bnexplore.sweep import sweep_link as sweep_run

__all__ = ["Scenario", "compare", "parse_link", "run", "sweep_run"]
