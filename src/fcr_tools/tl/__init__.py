"""Tools that read biology out of a trained FCR model (scanpy-style ``tl`` namespace)."""

from ._interaction import interaction_effects
from ._umap import block_umap
from ._usage import latent_usage

__all__ = [
    "block_umap",
    "interaction_effects",
    "latent_usage",
]
