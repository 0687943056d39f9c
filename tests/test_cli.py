"""The fcr-tools command line and the demo it runs."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from fcr_tools.cli import main


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_demo_requires_an_output_directory(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo"])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_quick_demo_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--epochs", "2", "--no-progress"]) == 0
    for name in ["report.json", "report.md", "umap_latents.png", "counterfactuals.csv"]:
        assert (out / name).stat().st_size > 0, name
    assert (out / "model" / "model.pt").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["latents"]["obsm_keys"] == ["X_fcr_x", "X_fcr_t", "X_fcr_tx"]
    umaps = ["X_umap_fcr_x", "X_umap_fcr_t", "X_umap_fcr_tx"]
    assert report["latents"]["umap_obsm_keys"] == umaps
    assert set(umaps) <= set(ad.read_h5ad(out / "latents.h5ad").obsm)
    methods = {"FCR", "FCR without shrinkage", "additive", "context-adjusted", "control_mean"}
    assert set(report["counterfactuals"]["mean_scores"]) == methods
    w = report["training"]["shrinkage_weight"]  # the quick screen has groups of 40 cells
    assert 0.0 <= w <= 1.0 and report["training"]["shrinkage_pairs"]
    assert "x FCR + " in (out / "report.md").read_text()
    assert "x context-adjusted baseline" in (out / "report.md").read_text()
    assert report["data"]["n_heldout_groups_scored"] > 0
    assert "R2 top-20 DEGs" in capsys.readouterr().out
    assert "Counterfactual prediction of held-out pairs" in (out / "report.md").read_text()


# ------------------------------------------------------------------ train and predict
TINY_ARGS = ["--n-latent", "2", "--n-hidden", "16", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize("command", ["train", "predict", "demo"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_train_then_predict(make_screen, tmp_path, capsys):
    make_screen().write_h5ad(tmp_path / "screen.h5ad")
    code = main(
        [
            "train",
            "--adata",
            str(tmp_path / "screen.h5ad"),
            "--treatment-key",
            "drug",
            "--covariate-keys",
            "cell_line",
            "--dose-key",
            "dose",
            "--out-model",
            str(tmp_path / "model"),
            "--out-adata",
            str(tmp_path / "latents.h5ad"),
            *TINY_ARGS,
        ]
    )
    assert code == 0
    assert (tmp_path / "model" / "model.pt").exists()
    latents = ad.read_h5ad(tmp_path / "latents.h5ad")
    assert {"X_fcr_x", "X_fcr_t", "X_fcr_tx"} <= set(latents.obsm)
    assert latents.obsm["X_fcr_tx"].shape == (latents.n_obs, 2)
    assert "Saved the model" in capsys.readouterr().err

    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "model"),
            "--adata",
            str(tmp_path / "screen.h5ad"),
            "--obs-filter",
            "drug=control",
            "--obs-filter",
            "cell_line=cell_line_1",
            "--treatment",
            "drug_2",
            "--dose",
            "0.3",
            "--out",
            str(tmp_path / "pred.h5ad"),
        ]
    )
    assert code == 0
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert set(pred.obs["cell_line"]) == {"cell_line_1"}
    assert set(pred.obs["source_drug"]) == {"control"}
    assert set(pred.obs["drug"]) == {"drug_2"} and set(pred.obs["dose"]) == {0.3}
    assert pred.n_vars == latents.n_vars and np.isfinite(pred.X).all()

    # --mode sample: one draw per cell, repeated by the same --seed
    sampled = []
    for seed, name in [("1", "a"), ("1", "b"), ("2", "c")]:
        args = ["predict", "--model", str(tmp_path / "model"), "--adata"]
        args += [str(tmp_path / "screen.h5ad"), "--obs-filter", "drug=control"]
        args += ["--treatment", "drug_2", "--dose", "0.3", "--mode", "sample", "--seed", seed]
        assert main([*args, "--out", str(tmp_path / f"{name}.h5ad")]) == 0
        sampled.append(ad.read_h5ad(tmp_path / f"{name}.h5ad"))
    assert sampled[0].uns["fcr_counterfactual"]["mode"] == "sample"
    np.testing.assert_array_equal(sampled[0].X, sampled[1].X)
    assert not np.allclose(sampled[0].X, sampled[2].X)


def test_train_on_mudata_with_counts_then_predict(make_screen, tmp_path, capsys):
    mudata = pytest.importorskip("mudata")
    mudata.MuData({"rna": make_screen()}).write(tmp_path / "screen.h5mu")
    code = main(
        [
            "train",
            "--adata",
            str(tmp_path / "screen.h5mu"),
            "--treatment-key",
            "drug",
            "--covariate-keys",
            "cell_line",
            "--layer",
            "counts",
            "--likelihood",
            "nb",
            "--out-model",
            str(tmp_path / "model"),
            "--out-adata",
            str(tmp_path / "latents.h5ad"),
            *TINY_ARGS,
        ]
    )
    assert code == 0
    assert "X_fcr_x" in ad.read_h5ad(tmp_path / "latents.h5ad").obsm

    # predict with the model trained from the .h5mu, on an .h5mu (filtered on the modality's obs)
    predict = ["predict", "--model", str(tmp_path / "model"), "--treatment", "drug_1"]
    predict += ["--out", str(tmp_path / "pred.h5ad"), "--obs-filter", "drug=control"]
    assert main([*predict, "--adata", str(tmp_path / "screen.h5mu")]) == 0
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert set(pred.obs["source_drug"]) == {"control"} and set(pred.obs["drug"]) == {"drug_1"}
    assert pred.n_vars == make_screen().n_vars and np.isfinite(pred.X).all()
    # an .h5ad for a model trained from an .h5mu: one clear line, naming the file
    make_screen().write_h5ad(tmp_path / "screen.h5ad")
    capsys.readouterr()
    assert main([*predict, "--adata", str(tmp_path / "screen.h5ad")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fcr-tools predict: error: --adata ")
    assert "screen.h5ad" in last and "trained from an .h5mu" in last


TRAIN = ["train", "--treatment-key", "drug", *TINY_ARGS]
PREDICT = ["predict", "--adata", "screen.h5ad", "--treatment", "drug_1", "--out", "p.h5ad"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*TRAIN, "--adata", "absent.h5ad", "--out-model", "m"], "absent.h5ad: no such file"),
        ([*TRAIN, "--adata", "screen.csv", "--out-model", "m"], "an .h5ad or .h5mu file"),
        (
            ["train", "--adata", "screen.h5ad", "--treatment-key", "drugs", "--out-model", "m"],
            "Did you mean ['drug']",
        ),
        (
            [*TRAIN, "--adata", "screen.h5ad", "--covariate-keys", "line", "--out-model", "m"],
            "'line'",
        ),
        ([*TRAIN, "--adata", "screen.h5ad", "--control", "DMSO", "--out-model", "m"], "'DMSO'"),
        ([*TRAIN, "--adata", "screen.h5ad", "--out-model", "full"], "--overwrite"),
        (
            [*TRAIN, "--adata", "screen.h5ad", "--out-model", "screen.csv"],
            "--out-model screen.csv: is a file",
        ),
        (
            [*TRAIN, "--adata", "screen.h5ad", "--out-model", "m", "--out-adata", "x.h5mu"],
            "--out-adata x.h5mu: the input screen.h5ad is an AnnData",
        ),
        ([*PREDICT, "--model", "m"], "not a saved FCR model"),
    ],
)
def test_clear_one_line_errors(args, message, make_screen, tmp_path, capsys):
    make_screen().write_h5ad(tmp_path / "screen.h5ad")  # the tests run in tmp_path
    (tmp_path / "screen.csv").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"fcr-tools {args[0]}: error: ")
    assert message in err
    assert not (tmp_path / "m").exists()  # refused before training


def test_predict_errors(make_screen, build_model, tmp_path, capsys):
    adata = make_screen()
    build_model(adata, train={"max_epochs": 1}).save(str(tmp_path / "model"))
    adata.write_h5ad(tmp_path / "screen.h5ad")
    base = [
        "predict",
        "--model",
        str(tmp_path / "model"),
        "--adata",
        str(tmp_path / "screen.h5ad"),
    ]
    out = ["--out", str(tmp_path / "p.h5ad")]
    assert main([*base, "--treatment", "drug_9", *out]) == 2
    assert "drug_9" in capsys.readouterr().err
    assert main([*base, "--treatment", "drug_1", "--obs-filter", "drug=none", *out]) == 2
    assert "no cell matches" in capsys.readouterr().err
    assert main([*base, "--treatment", "drug_1", "--obs-filter", "nope", *out]) == 2
    assert "COLUMN=VALUE" in capsys.readouterr().err


def test_train_chooses_the_shrinkage_unless_told_not_to(make_screen, tmp_path, capsys):
    make_screen(n_cells_per_condition=12).write_h5ad(tmp_path / "screen.h5ad")
    args = ["train", "--adata", str(tmp_path / "screen.h5ad"), "--treatment-key", "drug"]
    args += ["--covariate-keys", "cell_line", "--dose-key", "dose", *TINY_ARGS]
    assert main([*args, "--out-model", str(tmp_path / "a")]) == 0
    assert "Unmeasured pairs will be predicted as" in capsys.readouterr().err
    assert main([*args, "--out-model", str(tmp_path / "b"), "--no-shrinkage"]) == 0
    assert "Unmeasured pairs" not in capsys.readouterr().err
