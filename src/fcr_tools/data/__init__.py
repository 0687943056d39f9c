"""Built-in data: simulated perturbation screens with known ground truth."""

from ._simulate import simulate_counterfactual, simulate_screen

__all__ = ["simulate_counterfactual", "simulate_screen"]
