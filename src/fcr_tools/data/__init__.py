"""Data: simulated screens with known ground truth, the paper's data sets, bundled real screens."""

from ._loaders import mcfarland, sciplex3
from ._real import glioblastoma_panobinostat, norman19, sciplex_gxe
from ._simulate import simulate_counterfactual, simulate_screen
from ._store import StoreWriter, read_store, write_store

__all__ = [
    "StoreWriter",
    "glioblastoma_panobinostat",
    "mcfarland",
    "norman19",
    "read_store",
    "sciplex3",
    "sciplex_gxe",
    "simulate_counterfactual",
    "simulate_screen",
    "write_store",
]
