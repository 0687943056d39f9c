"""Training with Lightning DDP: two CPU processes (gloo), as on several GPUs.

Lightning's "ddp" strategy starts the training script again for each further process, which
cannot be done from inside pytest: the test runs ``tests/ddp_train.py`` in a subprocess. It
trains twice in the same two processes: on an AnnData in memory and on an on-disk store
(backed AnnData) from which each process reads its own shard; every test checks both.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from conftest import small_screen
from fcr_tools import FCRModel
from fcr_tools.data import write_store

SCRIPT = Path(__file__).with_name("ddp_train.py")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp")
    write_store(small_screen(n_treatments=3), out / "store.h5ad")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(key, None)  # let Lightning pick a free port for this run
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(out / "store.h5ad")],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


SOURCES = ["memory", "store"]


def _ranks(out: Path, source: str) -> list[dict]:
    ranks = [dict(np.load(out / f"{source}_rank{r}.npz")) for r in (0, 1)]
    assert [bool(r["backed"]) for r in ranks] == [source == "store"] * 2
    return ranks


def _training_data(out: Path, source: str) -> ad.AnnData:
    """The data both processes trained on: the store, or the AnnData saved by rank 0."""
    if source == "store":
        return ad.read_h5ad(out / "store.h5ad", backed="r")
    return ad.read_h5ad(out / "memory_model" / "adata.h5ad")


@pytest.mark.parametrize("source", SOURCES)
def test_two_processes_train_the_same_weights(ddp_run, source):
    ranks = _ranks(ddp_run, source)
    assert [int(r["world_size"]) for r in ranks] == [2, 2]
    # gradients are averaged across processes: both end with identical weights
    np.testing.assert_array_equal(ranks[0]["weights"], ranks[1]["weights"])


def test_the_store_trains_as_memory(ddp_run):
    # the same cells, seed and order: reading from the store changes nothing
    memory, store = (_ranks(ddp_run, source) for source in SOURCES)
    for a, b in zip(memory, store, strict=True):
        np.testing.assert_array_equal(a["rows"], b["rows"])
        np.testing.assert_array_equal(a["partners"], b["partners"])
        np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", SOURCES)
def test_each_process_pairs_its_cells_with_controls_of_their_group(ddp_run, source):
    out = ddp_run
    ranks = _ranks(out, source)
    adata = _training_data(out, source)
    drug = adata.obs["drug"].to_numpy()
    line = adata.obs["cell_line"].to_numpy()
    train = set(ranks[0]["train_idx"].tolist())
    assert train == set(ranks[1]["train_idx"].tolist())  # the same split in both processes
    shares = []
    for rank in ranks:
        rows, partners = rank["rows"], rank["partners"]
        assert (drug[partners] == "control").all()
        np.testing.assert_array_equal(line[partners], line[rows])
        trained = rows[np.isin(rows, list(train))]
        # training partners come from the training split
        assert set(partners[np.isin(rows, list(train))].tolist()) <= train
        shares.append(set(trained.tolist()))
    # the distributed sampler splits the training cells between the processes
    assert shares[0] | shares[1] == train
    assert len(shares[0] & shares[1]) <= 1  # at most the row that pads an odd split
    assert abs(len(shares[0]) - len(shares[1])) <= 1


@pytest.mark.parametrize("source", SOURCES)
def test_rank_zero_saves_a_usable_model(ddp_run, source):
    out = ddp_run
    ranks = _ranks(out, source)
    history = json.loads((out / f"{source}_history.json").read_text())
    assert len(history["train_loss"]) == 1 and np.isfinite(history["train_loss"]).all()
    assert "validation_loss" in history
    # the partners' terms are logged (synchronised) next to the cells' own
    for key in ("elbo_train", "elbo_partner_train", "kl_local_partner_validation"):
        assert np.isfinite(history[key]).all(), key
    data = _training_data(out, source) if source == "store" else None
    model = FCRModel.load(out / f"{source}_model", adata=data)
    assert model.is_trained and model.adata.isbacked == (source == "store")
    weights = torch.cat([p.detach().reshape(-1).double() for p in model.module.parameters()])
    np.testing.assert_array_equal(weights.numpy(), ranks[0]["weights"])
    latent = model.get_latent_representation()
    assert latent.shape == (model.adata.n_obs, 6) and np.isfinite(latent).all()
