"""Tools that read biology out of a trained FCR model (scanpy-style ``tl`` namespace)."""

from ._interaction import interaction_effects
from ._shrinkage import AdditiveShrinkage, fit_additive_shrinkage
from ._umap import block_umap
from ._usage import latent_usage

__all__ = [
    "AdditiveShrinkage",
    "block_umap",
    "fit_additive_shrinkage",
    "interaction_effects",
    "latent_usage",
]
