"""The theory of the sharpness-diversity trade-off on a random-design linear model.

A torch-only package, apart from the rest of sbfast: the theorem's closed-form bounds
(:mod:`~sbfast.theory.bounds`), the batched simulation (:mod:`~sbfast.theory.simulation`), the
notebook's four figures as sweeps (:mod:`~sbfast.theory.figures`) and their drawing with
matplotlib (:mod:`~sbfast.theory.plots`, imported on use). ``sbfast theory`` runs them; see
docs/reproduce.md.
"""

from sbfast.theory.bounds import Bounds, sam_bounds, sharpbalance_bounds
from sbfast.theory.figures import FIGURES, FigureData, Settings, compute_figure, quick_settings
from sbfast.theory.simulation import Simulation, simulate

__all__ = [
    "FIGURES",
    "Bounds",
    "FigureData",
    "Settings",
    "Simulation",
    "compute_figure",
    "quick_settings",
    "sam_bounds",
    "sharpbalance_bounds",
    "simulate",
]
