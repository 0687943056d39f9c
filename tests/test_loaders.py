"""Loaders of sciPlex3 and McFarland et al. on small files written in the published formats."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from fcr_tools import FCRModel
from fcr_tools.data import _loaders, mcfarland, sciplex3


def _write(path, obs: pd.DataFrame, n_genes: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.8, 3.0, size=n_genes), size=(len(obs), n_genes))
    obs.index = [f"cell_{i}" for i in range(len(obs))]
    var = pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)])
    ad.AnnData(sparse.csr_matrix(counts.astype(np.float32)), obs=obs, var=var).write_h5ad(path)
    return path


def sciplex3_scperturb(path, n: int = 5):
    """scPerturb / pertpy format: perturbation, cell_line, dose_value (nM), 'control'."""
    rows = []
    for line in ["A549", "K562", "MCF7"]:
        rows += [
            {"perturbation": "control", "cell_line": line, "dose_value": 0.0, "time": 24.0}
        ] * n
        for drug in ["Dexamethasone", "Vorinostat (SAHA)", "Nutlin-3a"]:
            for dose in [10.0, 100.0, 1000.0, 10000.0]:
                rows += [
                    {"perturbation": drug, "cell_line": line, "dose_value": dose, "time": 24.0}
                ] * n
    obs = pd.DataFrame(rows)
    obs["dose_unit"] = "nM"
    obs["perturbation_type"] = "drug"
    return _write(path, obs)


def sciplex3_cpa(path, n: int = 5):
    """The authors' / CPA format: product_name ('Vehicle'), cell_type, dose (nM)."""
    rows = []
    for line in ["A549", "K562", "MCF7"]:
        rows += [{"product_name": "Vehicle", "cell_type": line, "dose": 0.0}] * n
        for drug in ["Dex", "SAHA"]:
            for dose in [10.0, 100.0, 1000.0, 10000.0]:
                rows += [{"product_name": drug, "cell_type": line, "dose": dose}] * n
    return _write(path, pd.DataFrame(rows), seed=1)


def mcfarland_scperturb(path, n: int = 8):
    """scPerturb format of MIX-Seq: perturbation, cell_line, time, perturbation_type."""
    rows = []
    for line in ["NCIH226_LUNG", "DKMG_CENTRAL_NERVOUS_SYSTEM", "COV434_OVARY"]:
        for time in [6, 24]:
            for drug in ["control", "Idasanutlin", "Trametinib"]:
                rows += [
                    {"perturbation": drug, "cell_line": line, "time": time, "type": "drug"}
                ] * n
        rows += [{"perturbation": "sgGPX4", "cell_line": line, "time": 96, "type": "CRISPR"}] * n
    obs = pd.DataFrame(rows).rename(columns={"type": "perturbation_type"})
    return _write(path, obs, seed=2)


def test_sciplex3_scperturb_format(tmp_path):
    file = sciplex3_scperturb(tmp_path / "sciplex3.h5ad")
    adata = sciplex3(file, n_top_genes=25, n_holdout_pairs=2)
    assert adata.n_vars == 25 and "counts" in adata.layers
    assert sorted(adata.obs["drug"].cat.categories) == [
        "Dexamethasone",
        "Nutlin-3a",
        "Vorinostat (SAHA)",
        "control",
    ]
    assert adata.obs["dose"].max() == pytest.approx(1.0)
    assert sorted(adata.obs["dose_raw"].unique()) == [0.0, 10.0, 100.0, 1000.0, 10000.0]
    assert (adata.obs["split"] == "holdout").sum() == 2 * 4 * 5
    assert {"perturbation", "dose_value", "time"} <= set(adata.obs.columns)  # originals kept
    train = adata[adata.obs["split"] == "train"].copy()
    FCRModel.setup_anndata(
        train, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    )


def test_sciplex3_cpa_format_and_selection(tmp_path):
    file = sciplex3_cpa(tmp_path / "sciplex_cpa.h5ad")
    adata = sciplex3(file, cell_lines=["A549", "MCF7"], treatments="Dex", n_top_genes=None)
    assert sorted(adata.obs["cell_line"].unique()) == ["A549", "MCF7"]
    assert sorted(adata.obs["drug"].unique()) == ["Dex", "control"]
    assert adata.n_obs == 2 * (5 + 4 * 5)
    raw = sciplex3(file, preprocess=False)
    assert "counts" not in raw.layers and (raw.X.data == np.round(raw.X.data)).all()
    assert set(raw.obs["drug"]) == {"Vehicle", "Dex", "SAHA"}
    with pytest.raises(ValueError, match="HeLa"):
        sciplex3(file, cell_lines="HeLa")


def test_mcfarland_time_and_type(tmp_path):
    file = mcfarland_scperturb(tmp_path / "mcfarland.h5ad")
    adata = mcfarland(file, time=24, n_top_genes=None, n_holdout_pairs=1)
    assert set(adata.obs["time"]) == {24}
    assert sorted(adata.obs["drug"].cat.categories) == ["Idasanutlin", "Trametinib", "control"]
    assert "dose" not in adata.obs.columns  # no doses in the file: FCR's default dose 1
    assert adata.n_obs == 3 * 3 * 8
    assert (adata.obs["split"] == "holdout").sum() == 8
    everything = mcfarland(file, time=None, perturbation_type=None, preprocess=False)
    assert everything.n_obs == 3 * 7 * 8
    with pytest.raises(ValueError, match=r"time='48h'.*'24', '6', '96'"):
        mcfarland(file, time="48h")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server of ``tmp_path / "served"``: ``(url_of(name), requests_made)``."""
    monkeypatch.setattr(_loaders, "_RETRIES", 0)  # no waiting between failed attempts
    served = tmp_path / "served"
    served.mkdir()
    requests_made = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests_made.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = httpd.server_address[1]
    yield served, (lambda name: f"http://127.0.0.1:{port}/{name}"), requests_made
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_once_into_the_cache(tmp_path, server):
    served, url_of, requests_made = server
    source = sciplex3_scperturb(served / "published.h5ad")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    adata = sciplex3(
        url=url_of("published.h5ad"), cache_dir=cache, progress=False, n_top_genes=None
    )
    assert adata.n_obs == 3 * 13 * 5
    cached = cache / "SrivatsanTrapnell2020_sciplex3.h5ad"
    assert cached.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [cached.name]  # no sidecar, no leftovers
    assert len(requests_made) == 1
    # later loads read the cache, with or without a hash to check it against
    again = sciplex3(url=url_of("absent.h5ad"), cache_dir=cache, n_top_genes=None)
    assert again.shape == adata.shape
    again = sciplex3(url=url_of("absent.h5ad"), cache_dir=cache, checksum=digest.upper())
    assert len(requests_made) == 1
    # a cached file that does not match the hash is downloaded again
    cached.write_bytes(cached.read_bytes() + b"tampered")
    sciplex3(url=url_of("published.h5ad"), cache_dir=cache, checksum=f"sha256:{digest}")
    assert cached.read_bytes() == source.read_bytes()
    assert len(requests_made) == 2


def test_a_wrong_hash_is_refused(tmp_path, server, monkeypatch):
    served, url_of, _ = server
    source = mcfarland_scperturb(served / "published.h5ad")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"McFarland et al\. 2020: .*does not match the known"):
        mcfarland(url=url_of("published.h5ad"), cache_dir=cache, checksum="0" * 64)
    assert not list(cache.iterdir())  # nothing kept
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    adata = mcfarland(url=url_of("published.h5ad"), cache_dir=cache, checksum=f"md5:{md5}")
    assert adata.n_obs == 3 * 3 * 8
    # the hash fixed in the code is what a download is checked against by default
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    wrong = dataclasses.replace(_loaders._SCIPLEX3, known_hash="sha256:" + "1" * 64)
    monkeypatch.setattr(_loaders, "_SCIPLEX3", wrong)
    with pytest.raises(ValueError, match=f"sciPlex3: .*expected sha256:{'1' * 64} but got {sha}"):
        sciplex3(url=url_of("published.h5ad"), cache_dir=tmp_path / "other")
    right = dataclasses.replace(_loaders._SCIPLEX3, known_hash=f"sha256:{sha}")
    monkeypatch.setattr(_loaders, "_SCIPLEX3", right)
    sciplex3(url=url_of("published.h5ad"), cache_dir=tmp_path / "other", preprocess=False)
    # a local file is checked against checksum= (and left alone when it does not match)
    with pytest.raises(ValueError, match="checksum mismatch"):
        sciplex3(source, checksum="0" * 64)
    with pytest.raises(ValueError, match="checksum mismatch"):
        sciplex3(source, checksum="md5:" + "0" * 32)
    assert source.exists()
    sciplex3(source, checksum=f"md5:{md5.upper()}", preprocess=False)


def test_missing_files_and_network(tmp_path, server):
    _, url_of, _ = server
    with pytest.raises(FileNotFoundError, match="no such file"):
        sciplex3(tmp_path / "absent.h5ad")
    cache = tmp_path / "cache"
    with pytest.raises(ConnectionError, match=r"absent\.h5ad.*path="):
        mcfarland(url=url_of("absent.h5ad"), cache_dir=cache, progress=False)
    assert not list(cache.iterdir())
    with pytest.raises(ValueError, match=r"McFarland et al\. 2020: .*protocol 'file'"):
        mcfarland(url=(tmp_path / "absent.h5ad").as_uri(), cache_dir=cache)
