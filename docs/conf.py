"""Sphinx configuration of the fcr_tools documentation.

Build offline with ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Environment variables:

- ``FCR_TUTORIAL_EPOCHS``: training epochs of the tutorial notebooks (default: each
  notebook's own, 30 to 200; CI uses 3).
- ``FCR_DOCS_EXECUTE``: myst-nb execution mode, ``force`` (default), ``cache``, ``auto`` or
  ``off`` (render the stored notebooks without running them).
- ``FCR_DOCS_INTERSPHINX=1``: link to the Python / NumPy / AnnData / scvi-tools ... docs
  (needs a network connection; off by default).
"""

from __future__ import annotations

import os
import shutil
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # also works without an installed package

import fcr_tools  # noqa: E402

# -- tutorials: the notebooks live in notebooks/ and are copied next to their docs page ----
NOTEBOOKS = ROOT / "notebooks"
TUTORIALS = HERE / "tutorials"
for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
    target = TUTORIALS / notebook.name
    if not target.exists() or target.read_bytes() != notebook.read_bytes():
        shutil.copyfile(notebook, target)

# -- project information -------------------------------------------------------------------
project = "fcr_tools"
author = "fcr_tools developers"
copyright = f"{date.today():%Y}, {author}"
release = fcr_tools.__version__
version = ".".join(release.split(".")[:2])

# -- general configuration -----------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
if os.environ.get("FCR_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")

templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
default_role = "literal"
pygments_style = "default"

# autodoc / autosummary / napoleon (numpydoc style)
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "groupwise"
autodoc_default_options = {"show-inheritance": False}
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
# "Returns" sections are free text (numpydoc as scverse writes it), not "name : type" fields
napoleon_custom_sections = ["Returns"]
typehints_defaults = "braces"
always_document_param_types = False
typehints_document_rtype = True

# MyST / myst-nb
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("FCR_DOCS_EXECUTE", "force")
nb_execution_timeout = 900  # seconds per cell
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True
nb_output_stderr = "remove"  # training logs and library warnings
nb_merge_streams = True
fcr_tutorial_epochs = os.environ.get("FCR_TUTORIAL_EPOCHS", "30")

# intersphinx (only with FCR_DOCS_INTERSPHINX=1: there may be no network)
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "mudata": ("https://mudata.readthedocs.io/en/latest/", None),
}

# -- HTML output ---------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "fcr_tools"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
html_show_sourcelink = False


def _keep_free_text_returns(app) -> None:
    """Drop sphinx-autodoc-typehints' patch that turns numpy "Returns" into a typed field.

    Our "Returns" sections are free text (see ``napoleon_custom_sections``); the patch would
    prefix them with a stray ":".
    """
    from sphinx_autodoc_typehints import patches

    patch = getattr(patches, "napoleon_numpy_docstring_return_type_processor", None)
    listeners = getattr(app.events, "listeners", {}).get("autodoc-process-docstring", [])
    for listener in list(listeners):
        if patch is not None and listener.handler is patch:
            app.disconnect(listener.id)


def setup(app):
    """Rebuild the tutorials when ``FCR_TUTORIAL_EPOCHS`` changes; free-text "Returns"."""
    app.add_config_value("fcr_tutorial_epochs", "30", "env")
    _keep_free_text_returns(app)
