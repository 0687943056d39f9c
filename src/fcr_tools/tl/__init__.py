"""Tools that read biology out of a trained FCR model (scanpy-style ``tl`` namespace)."""

from ._interaction import interaction_effects

__all__ = ["interaction_effects"]
