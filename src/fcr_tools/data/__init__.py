"""Data: simulated screens with known ground truth, and loaders of the paper's data sets."""

from ._loaders import mcfarland, sciplex3
from ._simulate import simulate_counterfactual, simulate_screen

__all__ = ["mcfarland", "sciplex3", "simulate_counterfactual", "simulate_screen"]
