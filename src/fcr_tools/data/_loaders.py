"""Loaders of the paper's real data sets: sciPlex3 and McFarland et al. (MIX-Seq).

Each loader reads a local h5ad file, or downloads the scPerturb release of the data set once
into a cache folder with :mod:`pooch`, renames the columns FCR needs to ``cell_line``,
``drug`` and ``dose``, optionally selects cells, and applies the preprocessing recipe
:func:`fcr_tools.pp.prepare_screen`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pooch

from ..pp import prepare_screen
from ..pp._recipe import CONTROL_LABELS

__all__ = ["mcfarland", "sciplex3"]

SCIPLEX3_URL = (
    "https://zenodo.org/records/13350497/files/SrivatsanTrapnell2020_sciplex3.h5ad?download=1"
)
MCFARLAND_URL = "https://zenodo.org/records/10044268/files/McFarlandTsherniak2020.h5ad?download=1"
# a failed or corrupt download is tried this many more times (pooch waits 1 s, 2 s, ...)
_RETRIES = 2


@dataclass(frozen=True)
class _Format:
    """Where a data set keeps what FCR needs (first column found wins), and its file."""

    name: str
    filename: str
    treatment: tuple[str, ...]
    cell_line: tuple[str, ...]
    dose: tuple[str, ...]
    # Hash of the file at the default URL, in pooch's format ("sha256:<hex>" or
    # "md5:<hex>"). None: not known. fcr_tools 0.1 recorded the SHA-256 of each user's
    # first download instead of shipping it, and the files (1.5 and 2.5 GB) have not been
    # hashed where fcr_tools is developed, which has no access to Zenodo. Until the hashes
    # are filled in (Zenodo lists an MD5 per file of the record), downloads are not
    # checked unless ``checksum=`` is given.
    known_hash: str | None


_SCIPLEX3 = _Format(
    name="sciPlex3",
    filename="SrivatsanTrapnell2020_sciplex3.h5ad",
    treatment=("perturbation", "product_name", "drug", "treatment"),
    cell_line=("cell_line", "cell_type"),
    dose=("dose_value", "dose"),
    known_hash=None,
)
_MCFARLAND = _Format(
    name="McFarland et al. 2020",
    filename="McFarlandTsherniak2020.h5ad",
    treatment=("perturbation", "drug", "treatment"),
    cell_line=("cell_line", "DepMap_ID", "singlet_ID"),
    dose=("dose_value", "dose"),
    known_hash=None,
)


# ------------------------------------------------------------------ files and downloads
def default_cache_dir() -> Path:
    """The download cache: ``$FCR_TOOLS_CACHE``, else ``~/.cache/fcr_tools``."""
    return Path(os.environ.get("FCR_TOOLS_CACHE", Path.home() / ".cache" / "fcr_tools"))


def _check_local(fmt: _Format, path: Path, checksum: str) -> None:
    """Compare the hash of a local file with ``checksum`` (pooch's format)."""
    algorithm, _, expected = checksum.rpartition(":")
    actual = pooch.file_hash(str(path), alg=algorithm or "sha256")
    if actual.lower() != expected.lower():
        raise ValueError(
            f"{fmt.name}: checksum mismatch for {path}: {algorithm or 'sha256'} {actual}, "
            f"expected {expected}. The file is corrupt or another version of the data set."
        )


def _fetch(
    fmt: _Format,
    path: str | Path | None,
    url: str,
    cache_dir: str | Path | None,
    checksum: str | None,
    progress: bool,
) -> Path:
    """The local file of a data set: ``path``, or the cached (downloaded once) copy."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{fmt.name}: no such file {path}.")
        if checksum is not None:
            _check_local(fmt, path, checksum)
        return path
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    known_hash = checksum if checksum is not None else fmt.known_hash
    # pooch downloads into a temporary file, checks its hash, then moves it into the
    # cache; a cached file whose hash does not match is downloaded again
    fetcher = pooch.create(
        path=cache,
        base_url="",
        registry={fmt.filename: known_hash},
        urls={fmt.filename: url},
        retry_if_failed=_RETRIES,
    )
    try:
        return Path(fetcher.fetch(fmt.filename, progressbar=progress))
    except ValueError as err:  # hash mismatch, URL pooch cannot download
        raise ValueError(f"{fmt.name}: {err}") from err
    except OSError as err:  # requests' errors are OSErrors
        raise ConnectionError(
            f"Could not download {url} ({err}). Without a network, download the file "
            "elsewhere and pass path=... to read the local copy."
        ) from err


# ------------------------------------------------------------------ columns
def _find(obs: pd.DataFrame, candidates: Sequence[str], what: str, fmt: _Format) -> str:
    for name in candidates:
        if name in obs.columns:
            return name
    raise KeyError(
        f"{fmt.name}: no {what} column; expected one of {list(candidates)} in obs "
        f"(found {list(obs.columns)[:15]})."
    )


def _select(values: pd.Series, wanted, what: str) -> np.ndarray:
    wanted = [wanted] if isinstance(wanted, str | int | float) else list(wanted)
    present = set(values.astype(str))
    missing = [w for w in wanted if str(w) not in present]
    if missing:
        raise ValueError(f"{what} {missing} not found (available: {sorted(present)[:20]}).")
    return values.astype(str).isin([str(w) for w in wanted]).to_numpy()


def _read(
    file: Path,
    fmt: _Format,
    cell_lines,
    treatments,
    extra_masks,
) -> ad.AnnData:
    """Read the file, keep the selected cells, add the columns cell_line, drug, dose."""
    backed = ad.read_h5ad(file, backed="r")
    try:
        obs = backed.obs
        treatment_col = _find(obs, fmt.treatment, "treatment", fmt)
        cell_line_col = _find(obs, fmt.cell_line, "cell line", fmt)
        keep = np.ones(backed.n_obs, dtype=bool)
        if cell_lines is not None:
            keep &= _select(obs[cell_line_col], cell_lines, "Cell lines")
        if treatments is not None:
            labels = obs[treatment_col].astype(str)
            wanted = [treatments] if isinstance(treatments, str) else list(treatments)
            keep &= _select(labels, wanted, "Treatments") | labels.isin(CONTROL_LABELS).to_numpy()
        for mask in extra_masks:
            keep &= mask(obs, treatment_col)
        if not keep.any():
            raise ValueError(f"{fmt.name}: no cells left after the selection.")
        adata = backed[keep].to_memory() if not keep.all() else backed.to_memory()
    finally:
        backed.file.close()
    adata.obs["cell_line"] = adata.obs[cell_line_col].astype(str).astype("category")
    adata.obs["drug"] = adata.obs[treatment_col].astype(str)
    dose_col = next((c for c in fmt.dose if c in adata.obs.columns), None)
    if dose_col is not None:
        adata.obs["dose"] = pd.to_numeric(adata.obs[dose_col], errors="coerce")
    return adata


def _finish(adata: ad.AnnData, preprocess: bool, prepare_kwargs: dict) -> ad.AnnData:
    if not preprocess:
        return adata
    use_dose = "dose" in adata.obs.columns
    if use_dose:
        treated = ~adata.obs["drug"].isin([*CONTROL_LABELS, "control"])
        doses = adata.obs.loc[treated, "dose"]
        use_dose = bool(doses.notna().all() and doses.nunique() > 1)
    prepare_screen(
        adata,
        treatment_key="drug",
        covariate_keys="cell_line",
        dose_key="dose" if use_dose else None,
        inplace=True,
        **prepare_kwargs,
    )
    return adata


# ------------------------------------------------------------------ public loaders
def sciplex3(
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    url: str = SCIPLEX3_URL,
    checksum: str | None = None,
    cell_lines: str | Sequence[str] | None = None,
    treatments: str | Sequence[str] | None = None,
    preprocess: bool = True,
    progress: bool = True,
    **prepare_kwargs,
) -> ad.AnnData:
    """sciPlex3 (Srivatsan et al. 2020): A549, K562 and MCF7 cells x 188 compounds x 4 doses.

    Reads ``path`` if given; otherwise downloads scPerturb's harmonised release
    (``SrivatsanTrapnell2020_sciplex3.h5ad``, several GB) once into ``cache_dir``.

    Expected format (raw counts in ``X``, one row per cell), as in scPerturb, pertpy
    (``srivatsan_2020_sciplex3``) and CPA / chemCPA:

    - treatment: ``obs["perturbation"]`` (scPerturb) or ``obs["product_name"]`` (the
      authors' / CPA files), controls labelled ``control``, ``Vehicle`` or ``DMSO``;
    - cell line: ``obs["cell_line"]`` or ``obs["cell_type"]``;
    - dose in nM (10, 100, 1000, 10000): ``obs["dose_value"]`` or ``obs["dose"]``.

    The loader adds ``obs["cell_line"]``, ``obs["drug"]`` and ``obs["dose"]`` (original
    columns are kept) and, with ``preprocess=True``, applies
    :func:`fcr_tools.pp.prepare_screen` (controls relabelled ``control``; doses in nM
    scaled to ``log10(1 + d) / log10(1 + 10000)`` with the raw values in
    ``obs["dose_raw"]``; counts in ``layers["counts"]``, log-normalised ``X``, 2,000 HVGs;
    ``obs["split"]``).

    Parameters
    ----------
    path
        A local h5ad file in the format above (no download).
    cache_dir
        Download folder (default ``$FCR_TOOLS_CACHE`` or ``~/.cache/fcr_tools``).
    url
        Where to download from (``http(s)://``, ``ftp://``, ``sftp://`` or ``doi:``).
    checksum
        Expected hash of the file: a SHA-256 hex digest, or ``"md5:<hex>"`` /
        ``"sha256:<hex>"``. A download that does not match is refused, a cached file that
        does not match is downloaded again, and a local ``path`` that does not match raises.
        ``None``: the hash fixed in fcr_tools for the default URL, which is not known yet,
        so the download is not checked (see ``docs/data.md``).
    cell_lines
        Keep these cell lines only.
    treatments
        Keep these treatments (and the controls) only.
    preprocess
        Apply :func:`fcr_tools.pp.prepare_screen`; ``False`` returns the file's cells with
        the three columns added.
    progress
        Show download progress.
    **prepare_kwargs
        Passed to :func:`~fcr_tools.pp.prepare_screen`, e.g. ``n_top_genes``,
        ``n_holdout_pairs``, ``holdout_pairs``, ``dose_scaling``.

    Returns
    -------
    AnnData ready for ``FCRModel.setup_anndata(adata, treatment_key="drug",
    dose_key="dose", covariate_keys="cell_line")``.

    Examples
    --------
    >>> from fcr_tools.data import sciplex3
    >>> adata = sciplex3(
    ...     treatments=["Dexamethasone", "Vorinostat (SAHA)"], n_holdout_pairs=1
    ... )  # doctest: +SKIP
    >>> adata = sciplex3("SrivatsanTrapnell2020_sciplex3.h5ad")  # doctest: +SKIP
    """
    file = _fetch(_SCIPLEX3, path, url, cache_dir, checksum, progress)
    adata = _read(file, _SCIPLEX3, cell_lines, treatments, extra_masks=[])
    return _finish(adata, preprocess, prepare_kwargs)


def mcfarland(
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    url: str = MCFARLAND_URL,
    checksum: str | None = None,
    time: float | str | None = 24,
    perturbation_type: str | None = "drug",
    cell_lines: str | Sequence[str] | None = None,
    treatments: str | Sequence[str] | None = None,
    preprocess: bool = True,
    progress: bool = True,
    **prepare_kwargs,
) -> ad.AnnData:
    """MIX-Seq (McFarland et al. 2020): pools of up to 99 cancer cell lines x drugs.

    Reads ``path`` if given; otherwise downloads scPerturb's harmonised release
    (``McFarlandTsherniak2020.h5ad``) once into ``cache_dir``.

    Expected format (raw counts in ``X``, one row per cell), as in scPerturb and pertpy
    (``mcfarland_2020``):

    - treatment: ``obs["perturbation"]``, controls labelled ``control`` or ``DMSO``;
    - cell line: ``obs["cell_line"]`` (CCLE names such as ``NCIH226_LUNG``) or
      ``obs["DepMap_ID"]``;
    - optional ``obs["time"]`` (hours after treatment), ``obs["perturbation_type"]``
      (``drug`` or ``CRISPR``) and ``obs["dose_value"]`` / ``obs["dose"]``.

    The loader selects one time point and the drug perturbations, adds
    ``obs["cell_line"]``, ``obs["drug"]`` (and ``obs["dose"]`` when present) and, with
    ``preprocess=True``, applies :func:`fcr_tools.pp.prepare_screen`. Doses are used only
    when they vary between treated cells; otherwise every treated cell has dose 1.

    Parameters
    ----------
    path
        A local h5ad file in the format above (no download).
    cache_dir
        Download folder (default ``$FCR_TOOLS_CACHE`` or ``~/.cache/fcr_tools``).
    url
        Where to download from (``http(s)://``, ``ftp://``, ``sftp://`` or ``doi:``).
    checksum
        Expected hash of the file, as in :func:`sciplex3`.
    time
        Keep the cells of this time point (``obs["time"]``); ``None`` keeps all (then
        responses at different times share one treatment label).
    perturbation_type
        Keep this ``obs["perturbation_type"]`` (default the drugs); ``None`` keeps all.
    cell_lines
        Keep these cell lines only.
    treatments
        Keep these treatments (and the controls) only.
    preprocess
        Apply :func:`fcr_tools.pp.prepare_screen`.
    progress
        Show download progress.
    **prepare_kwargs
        Passed to :func:`~fcr_tools.pp.prepare_screen`.

    Returns
    -------
    AnnData ready for ``FCRModel.setup_anndata(adata, treatment_key="drug",
    covariate_keys="cell_line")`` (add ``dose_key="dose"`` when ``obs["dose"]`` exists).

    Examples
    --------
    >>> from fcr_tools.data import mcfarland
    >>> adata = mcfarland(time=24, n_holdout_pairs=5)  # doctest: +SKIP
    """
    masks = []
    if time is not None:

        def at_time(obs, treatment_col):
            if "time" not in obs.columns:
                raise KeyError(
                    "McFarland et al. 2020: time=... needs obs['time']; pass time=None."
                )
            mask = (obs["time"].astype(str) == str(time)).to_numpy()
            try:
                mask |= (pd.to_numeric(obs["time"], errors="coerce") == float(time)).to_numpy()
            except (TypeError, ValueError):
                pass
            if not mask.any():
                times = sorted(set(obs["time"].astype(str)))
                raise ValueError(f"No cells at time={time!r}; obs['time'] holds {times}.")
            return mask

        masks.append(at_time)
    if perturbation_type is not None:

        def of_type(obs, treatment_col):
            if "perturbation_type" not in obs.columns:
                return np.ones(len(obs), dtype=bool)
            is_control = obs[treatment_col].astype(str).isin(CONTROL_LABELS)
            of_kind = obs["perturbation_type"].astype(str) == perturbation_type
            return (of_kind | is_control).to_numpy()

        masks.append(of_type)
    file = _fetch(_MCFARLAND, path, url, cache_dir, checksum, progress)
    adata = _read(file, _MCFARLAND, cell_lines, treatments, extra_masks=masks)
    return _finish(adata, preprocess, prepare_kwargs)
