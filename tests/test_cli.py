"""The fcr-tools command line and the demo it runs."""

from __future__ import annotations

import json

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
    assert set(report["counterfactuals"]["mean_scores"]) == {"FCR", "additive", "control_mean"}
    assert report["data"]["n_heldout_groups_scored"] > 0
    assert "R2 top-20 DEGs" in capsys.readouterr().out
    assert "Counterfactual prediction of held-out pairs" in (out / "report.md").read_text()
