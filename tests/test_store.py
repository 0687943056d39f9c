"""Training and prediction from an on-disk store (an ``.h5ad`` in AnnData's backed mode)."""

import gc
import weakref

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
from lightning.pytorch.callbacks import Callback
from scipy import sparse

from conftest import SETUP, TINY, TRAIN
from fcr_tools import FCRModel
from fcr_tools._backed import arrow_names
from fcr_tools.data import StoreWriter, read_store, write_store
from fcr_tools.data import _store as store_module


def _train(adata, **train):
    FCRModel.setup_anndata(adata, **SETUP)
    scvi.settings.seed = 0
    model = FCRModel(adata, **TINY)
    model.train(**{**TRAIN, **train})
    return model


@pytest.fixture
def store_path(adata, tmp_path):
    path = tmp_path / "screen.h5ad"
    write_store(adata, path, chunk_rows=50)  # several chunks
    return path


@pytest.fixture(scope="module")
def trained_pair(_screen_template, tmp_path_factory):
    """The same model trained in memory and from a store (same seed, same data order).

    Shared by the tests of this module: they read from the models and may write latents into
    the store, but neither train them further nor change the store's expression.
    """
    folder = tmp_path_factory.mktemp("store")
    old_dir, scvi.settings.logging_dir = scvi.settings.logging_dir, folder / "scvi_log"
    memory = _screen_template.copy()
    memory.X = memory.X.astype(np.float32)  # the store's dtype
    write_store(memory, folder / "screen.h5ad", chunk_rows=50)  # several chunks
    try:
        yield _train(memory), _train(read_store(folder / "screen.h5ad"))
    finally:
        scvi.settings.logging_dir = old_dir


def test_write_store_round_trip(adata, store_path):
    store = read_store(store_path)
    assert store.isbacked and store.shape == adata.shape
    np.testing.assert_array_equal(store.X[:].toarray(), adata.X.astype(np.float32))
    assert store.obs.equals(adata.obs) and store.var_names.equals(adata.var_names)
    # a backed source (a file), a layer and a CSR source give the same store
    write_store(store_path, "again.h5ad", layer=None, chunk_rows=7)
    np.testing.assert_array_equal(read_store("again.h5ad").X[:].toarray(), store.X[:].toarray())
    adata.layers["csr"] = sparse.csr_matrix(adata.X)
    write_store(adata, "layer.h5ad", layer="csr")
    np.testing.assert_array_equal(read_store("layer.h5ad").X[:].toarray(), store.X[:].toarray())


def test_store_writer_staged_and_sized(adata, tmp_path):
    # unknown nnz: staged in a side file, laid out on close; known nnz: written in place
    expected = adata.X.astype(np.float32)
    for nnz in (None, int(np.count_nonzero(expected))):
        with StoreWriter(tmp_path / "w.h5ad", adata.obs, adata.var, nnz=nnz) as writer:
            for start in range(0, adata.n_obs, 33):
                writer.append(adata.X[start : start + 33])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5ad"]
        store = read_store(tmp_path / "w.h5ad")
        np.testing.assert_array_equal(store.X[:].toarray(), expected)
        assert store.X.group["indptr"].dtype == np.int32
        store.file.close()
    with pytest.raises(ValueError, match="nnz=5"):
        with StoreWriter(tmp_path / "w.h5ad", adata.obs.iloc[:1], adata.var, nnz=5) as writer:
            writer.append(adata.X[:1])


def test_store_writer_checks_its_rows(adata, tmp_path):
    with pytest.raises(ValueError, match="genes"):
        with StoreWriter(tmp_path / "w.h5ad", adata.obs, adata.var) as writer:
            writer.append(adata.X[:10, :5])
    writer = StoreWriter(tmp_path / "w.h5ad", adata.obs, adata.var)
    writer.append(adata.X[:10])
    with pytest.raises(ValueError, match="incomplete"):
        writer.close()
    with pytest.raises(ValueError, match="More rows"):
        with StoreWriter(tmp_path / "w.h5ad", adata.obs.iloc[:5], adata.var) as writer:
            writer.append(adata.X[:10])


def test_csc_stores_are_refused(adata, tmp_path):
    adata.X = sparse.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSC"):
        read_store(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSR first"):
        write_store(tmp_path / "csc.h5ad", tmp_path / "out.h5ad")


def test_training_from_a_store_matches_memory(trained_pair):
    memory, store = trained_pair
    assert store.adata.isbacked
    for key in ("train_loss", "elbo_validation"):
        np.testing.assert_allclose(
            store.history[key].to_numpy(float), memory.history[key].to_numpy(float), rtol=1e-5
        )
    np.testing.assert_allclose(
        store.get_latent_representation(), memory.get_latent_representation(), atol=1e-5
    )


def test_prediction_from_a_store_matches_memory(trained_pair, adata):
    memory, store = trained_pair
    controls = np.flatnonzero(adata.obs["drug"] == "control")
    kwargs = {"treatment": "drug_1", "dose": 0.3, "indices": controls, "batch_size": 16}
    a = store.predict_counterfactual(**kwargs)
    b = memory.predict_counterfactual(**kwargs)
    np.testing.assert_allclose(a.X, b.X, atol=1e-5)
    assert a.obs.equals(b.obs)
    for aggregate in ("cells", "mean"):
        grid = {"treatment": ["drug_0", "drug_2"], "dose": [0.3, 1.0], "aggregate": aggregate}
        a, b = store.predict_grid(**grid), memory.predict_grid(**grid)
        np.testing.assert_allclose(a.X, b.X, atol=1e-5)
        assert a.obs.equals(b.obs)
    # the store-trained model on in-memory data, the memory-trained one on the store
    np.testing.assert_allclose(
        memory.get_latent_representation(store.adata, block="tx"),
        store.get_latent_representation(memory.adata, block="tx"),
        atol=1e-5,
    )


def test_write_latents_into_the_store(trained_pair):
    memory, store = trained_pair
    store_path = store.adata.filename
    expected = memory.get_latent_representation()
    store.write_latents(batch_size=50)
    assert "X_fcr_x" not in store.adata.obsm  # written to the file, not kept in memory
    # the store is still read from (reopened read-only; its own write is no change of the store)
    assert store.adata.file["X"].file.mode == "r"
    np.testing.assert_allclose(store.get_latent_representation(), expected, atol=1e-5)
    reopened = ad.read_h5ad(store_path)
    written = np.hstack([reopened.obsm[f"X_fcr_{b}"] for b in ("x", "t", "tx")])
    np.testing.assert_allclose(written, expected, atol=1e-5)
    # a store that is not the model's training data
    memory.write_latents(store.adata, prefix="mem")
    other = read_store(store_path)  # a second handle on the file: it cannot be written to
    with pytest.raises(OSError, match="Close the other"):
        memory.write_latents(other)
    other.file.close()
    again = ad.read_h5ad(store_path)
    np.testing.assert_allclose(again.obsm["mem_tx"], expected[:, -2:], atol=1e-6)
    assert "X_fcr_x" in again.obsm


def test_store_without_the_registered_columns(trained_pair, adata, tmp_path):
    memory, _ = trained_pair
    write_store(adata[:, :].copy(), tmp_path / "full.h5ad")
    lacking = adata.copy()
    del lacking.obs["cell_line"]
    write_store(lacking, tmp_path / "lacking.h5ad")
    with pytest.raises(KeyError, match="cell_line"):
        FCRModel.setup_anndata(read_store(tmp_path / "lacking.h5ad"), **SETUP)
    with pytest.raises(KeyError, match="cell_line"):
        memory.get_latent_representation(read_store(tmp_path / "lacking.h5ad"))
    fewer_genes = adata[:, :20].copy()
    write_store(fewer_genes, tmp_path / "genes.h5ad")
    with pytest.raises(ValueError, match="lacks 10 of the model's genes"):
        memory.predict_counterfactual(read_store(tmp_path / "genes.h5ad"), treatment="drug_1")


def test_store_with_a_group_without_controls(adata, tmp_path):
    keep = ~((adata.obs["cell_line"] == "cell_line_1") & (adata.obs["drug"] == "control"))
    write_store(adata[keep].copy(), tmp_path / "no_controls.h5ad")
    store = read_store(tmp_path / "no_controls.h5ad")
    FCRModel.setup_anndata(store, **SETUP)
    model = FCRModel(store, **TINY)
    with pytest.raises(ValueError, match="cell_line='cell_line_1'"):
        model.train(**TRAIN)


@pytest.mark.parametrize("change", ["cells", "genes", "values"])
def test_store_changed_after_setup(adata, store_path, change):
    store = read_store(store_path)
    FCRModel.setup_anndata(store, **SETUP)
    model = FCRModel(store, **TINY)
    store.file.close()  # the file is rewritten by someone else
    new = {"cells": adata[:100], "genes": adata[:, :20], "values": adata}[change].copy()
    if change == "values":
        new.X = new.X[::-1].copy()
        new.X[0, 0] += 1.0  # another file, same shape
    write_store(new, store_path)
    with pytest.raises(ValueError, match="is closed"):
        model.get_latent_representation()
    store.file.open()
    with pytest.raises(ValueError, match="changed after setup"):
        model.train(**TRAIN)
    with pytest.raises(ValueError, match="changed after setup"):
        model.get_latent_representation()


def _engine_built(index) -> bool:
    """Whether pandas built the hash table of an index (for Arrow strings: a Python string
    per label first)."""
    return "_engine" in getattr(index, "_cache", {})


def test_read_store_names_as_arrow_or_objects(adata, tmp_path):
    adata.obs.index.name = "cell"
    adata.obsm["X_pca"] = np.asarray(adata.X)[:, :3]
    adata.uns["note"] = {"a": 1}
    adata.raw = adata.copy()
    adata.X = sparse.csr_matrix(adata.X)
    adata.write_h5ad(tmp_path / "full.h5ad")
    reference = ad.read_h5ad(tmp_path / "full.h5ad", backed="r")
    arrow = read_store(tmp_path / "full.h5ad", obs_names="arrow")
    plain = read_store(tmp_path / "full.h5ad", obs_names="object")
    assert arrow_names(arrow.obs_names)
    assert plain.obs_names.dtype == reference.obs_names.dtype  # as anndata reads them
    assert arrow.obs_names.tolist() == adata.obs_names.tolist() == plain.obs_names.tolist()
    for store in (arrow, plain):
        assert store.isbacked and store.obs_names.name == "cell"
        pd.testing.assert_frame_equal(store.obs, reference.obs, check_index_type=False)
        pd.testing.assert_frame_equal(store.var, reference.var)
        assert "X_pca" in store.obsm and list(store.obsm) == list(reference.obsm)
        for key in store.obsm:
            np.testing.assert_array_equal(store.obsm[key], reference.obsm[key])
        assert store.uns["note"] == {"a": 1}
        assert list(store.layers) == list(reference.layers)
        assert store.raw.var_names.equals(reference.raw.var_names)
        assert store.raw.shape == reference.raw.shape
        np.testing.assert_array_equal(store.X[:5].toarray(), reference.X[:5].toarray())
    assert not _engine_built(arrow.obs_names)  # names not hashed as Python strings


def test_read_store_without_pyarrow(store_path, monkeypatch):
    with pytest.raises(ValueError, match="obs_names must be"):
        read_store(store_path, obs_names="python")
    monkeypatch.setattr(store_module, "arrow_string_dtype", lambda: None)
    anndatas = ad.read_h5ad(store_path, backed="r").obs_names
    assert read_store(store_path).obs_names.dtype == anndatas.dtype  # "auto": anndata's names
    with pytest.raises(ImportError, match=r"fcr-tools\[store\]"):
        read_store(store_path, obs_names="arrow")


def test_read_store_warns_of_repeated_names(adata, tmp_path):
    names = adata.obs_names.to_numpy().copy()
    names[5] = names[2]
    adata.obs_names = names
    write_store(adata, tmp_path / "repeated.h5ad")
    for kind in ("arrow", "object"):
        with pytest.warns(UserWarning, match="Observation names are not unique"):
            read_store(tmp_path / "repeated.h5ad", obs_names=kind)


def test_arrow_names_survive_training_and_are_written_as_strings(trained_pair, tmp_path):
    memory, store = trained_pair
    names = store.adata.obs_names
    assert arrow_names(names)  # pyarrow is installed with the test extras
    store.get_latent_representation()
    memory.get_latent_representation(store.adata)  # the store as new data of another model
    store.predict_grid(treatment=["drug_0", "drug_2"], dose=[0.3, 1.0], aggregate="mean")
    pred = store.predict_counterfactual(treatment="drug_1", dose=0.3, indices=[0, 4])
    # neither setup, training nor inference hashed the names; results carry Python strings
    assert not _engine_built(names) and store.adata.obs_names is names
    assert pred.obs_names.tolist() == list(memory.adata.obs_names[[0, 4]])
    pred.write_h5ad(tmp_path / "pred.h5ad")
    assert ad.read_h5ad(tmp_path / "pred.h5ad").obs_names.equals(pred.obs_names)
    write_store(store.adata, tmp_path / "copy.h5ad", chunk_rows=30)  # a store from a store
    copy = read_store(tmp_path / "copy.h5ad", obs_names="object")
    assert copy.obs_names.tolist() == names.tolist()


def test_training_lets_its_loaders_go(adata, store_path):
    # the trainer (kept as model.trainer) no longer holds the training data's loaders
    datasets = []

    class Keep(Callback):
        def on_train_start(self, trainer, pl_module):
            datasets.append(weakref.ref(trainer.train_dataloader.dataset))

    _train(read_store(store_path), callbacks=[Keep()])
    gc.collect()
    assert len(datasets) == 1 and datasets[0]() is None


def test_store_with_python_names_trains_the_same(trained_pair):
    # the names as anndata reads them (no pyarrow): the same training, and setup leaves them
    # unhashed there too
    memory, arrow_store = trained_pair
    store = read_store(arrow_store.adata.filename, obs_names="object")
    model = _train(store)
    np.testing.assert_allclose(
        model.history["train_loss"].to_numpy(float),
        memory.history["train_loss"].to_numpy(float),
        rtol=1e-5,
    )
    assert not _engine_built(store.obs_names)


def test_axes_of_a_large_screen_are_chosen_on_a_subset(adata, store_path, monkeypatch):
    """Beyond ALIGN_MAX_CELLS cells, the axes of z_tx are chosen on a seeded random subset,
    read from the store like any inference."""
    import fcr_tools._model as model_module

    monkeypatch.setattr(model_module, "ALIGN_MAX_CELLS", 60)
    seen = []
    original = FCRModel.align_interaction_axes

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("indices"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FCRModel, "align_interaction_axes", spy)
    model = _train(read_store(store_path), shrinkage=False)
    (indices,) = seen
    assert len(indices) == 60 and len(set(indices)) == 60
    assert list(indices) == sorted(indices) and max(indices) < adata.n_obs
    assert model.interaction_axes_ is not None
    assert model.interaction_axes_["rotation"].shape == (2, 2)
