"""TreatmentEncoder: labels and doses -> padded sparse form -> dense treatment vectors."""

import numpy as np
import pytest
import torch

from fcr_tools._treatments import TreatmentEncoder, dense_treatment, split_treatment

LABELS = ["control", "drug_b", "drug_a", "drug_c", "drug_a+drug_b"]


@pytest.fixture
def encoder():
    return TreatmentEncoder.from_labels(LABELS, control="control")


def _dense(encoder, idx, dose):
    return dense_treatment(
        torch.as_tensor(idx), torch.as_tensor(dose), encoder.n_components
    ).numpy()


def test_components_sorted_without_control(encoder):
    assert encoder.components == ("drug_a", "drug_b", "drug_c")
    assert encoder.n_components == 3
    assert encoder.max_parts == 2
    assert encoder.control == "control"


def test_single_treatments_only_have_one_part():
    enc = TreatmentEncoder.from_labels(["ctrl", "x", "y"], control="ctrl")
    assert enc.max_parts == 1
    idx, dose = enc.encode(["y", "ctrl", "x"], [0.5, 0.0, 2.0])
    assert idx.shape == (3, 1) and dose.shape == (3, 1)
    np.testing.assert_array_equal(idx[:, 0], [1, 2, 0])  # control -> padding index 2
    np.testing.assert_allclose(dose[:, 0], [0.5, 0.0, 2.0])


def test_split_treatment_strips_spaces():
    assert split_treatment("a + b") == ["a", "b"]
    assert split_treatment("a") == ["a"]


def test_encode_dtypes_and_padding(encoder):
    idx, dose = encoder.encode(["drug_c", "control"], [0.25, 0.0])
    assert idx.dtype == np.int64 and dose.dtype == np.float32
    np.testing.assert_array_equal(idx, [[2, 3], [3, 3]])
    np.testing.assert_allclose(dose, [[0.25, 0.0], [0.0, 0.0]])


def test_combination_multi_hot_shared_dose(encoder):
    idx, dose = encoder.encode(["drug_a+drug_b"], [0.5])
    np.testing.assert_allclose(_dense(encoder, idx, dose), [[0.5, 0.5, 0.0]])


def test_combination_per_part_doses(encoder):
    idx, dose = encoder.encode(["drug_a+drug_b", "drug_a+drug_b"], ["0.1+0.9", "0.3"])
    np.testing.assert_allclose(_dense(encoder, idx, dose), [[0.1, 0.9, 0.0], [0.3, 0.3, 0.0]])


def test_combination_order_of_parts_follows_label(encoder):
    # "drug_b+drug_a" was not a registered label, but its components are known
    idx, dose = encoder.encode(["drug_b+drug_a"], ["0.2+0.7"])
    np.testing.assert_allclose(_dense(encoder, idx, dose), [[0.7, 0.2, 0.0]])


def test_no_doses_means_dose_one(encoder):
    idx, dose = encoder.encode(["drug_c", "drug_a+drug_b", "control"])
    np.testing.assert_allclose(
        _dense(encoder, idx, dose), [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    )


@pytest.mark.parametrize("control_dose", [0.0, 1.0, 7.5, np.nan, "junk", None, "1+2+3", -3.0])
def test_controls_are_zero_whatever_their_dose(encoder, control_dose):
    idx, dose = encoder.encode(["control", "drug_a"], [control_dose, 0.4])
    dense = _dense(encoder, idx, dose)
    np.testing.assert_array_equal(dense[0], 0.0)
    np.testing.assert_allclose(dense[1], [0.4, 0.0, 0.0])


def test_dense_treatment_matches_hand_built(encoder):
    labels = ["drug_b", "control", "drug_a+drug_b", "drug_c", "drug_a+drug_b"]
    doses = [0.3, np.nan, "0.2+1.5", 1.0, 2]
    idx, dose = encoder.encode(labels, doses)
    expected = np.array(
        [
            [0.0, 0.3, 0.0],
            [0.0, 0.0, 0.0],
            [0.2, 1.5, 0.0],
            [0.0, 0.0, 1.0],
            [2.0, 2.0, 0.0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(_dense(encoder, idx, dose), expected, rtol=1e-6)


def test_repeated_label_dose_pairs_are_encoded_identically(encoder):
    labels = ["drug_a", "drug_b", "drug_a", "drug_a"]
    doses = [0.5, 0.5, 0.5, 1.0]
    idx, dose = encoder.encode(labels, doses)
    np.testing.assert_array_equal(idx[0], idx[2])
    np.testing.assert_array_equal(dose[0], dose[2])
    assert dose[3, 0] == 1.0 and idx[1, 0] == 1


def test_encode_one_repeats(encoder):
    idx, dose = encoder.encode_one("drug_a+drug_b", "0.1+0.2", n=4)
    assert idx.shape == (4, 2)
    np.testing.assert_allclose(_dense(encoder, idx, dose), np.tile([0.1, 0.2, 0.0], (4, 1)))
    idx, dose = encoder.encode_one("drug_c")
    np.testing.assert_allclose(_dense(encoder, idx, dose), [[0.0, 0.0, 1.0]])


# ---------------------------------------------------------------------------- errors
def test_unknown_treatment_is_named(encoder):
    with pytest.raises(ValueError, match="'drug_z'"):
        encoder.encode(["drug_a", "drug_z"], [1.0, 1.0])


def test_unknown_part_of_a_combination_is_named(encoder):
    with pytest.raises(ValueError, match=r"'drug_q'.*'drug_a\+drug_q'"):
        encoder.encode(["drug_a+drug_q"], [1.0])


def test_too_many_parts(encoder):
    with pytest.raises(ValueError, match=r"drug_a\+drug_b\+drug_c"):
        encoder.encode(["drug_a+drug_b+drug_c"], [1.0])


@pytest.mark.parametrize("bad_dose", ["0.1+0.2+0.3", "1+2+3+4"])
def test_wrong_number_of_doses(encoder, bad_dose):
    with pytest.raises(ValueError, match="2 parts"):
        encoder.encode(["drug_a+drug_b"], [bad_dose], dose_column="dose")


def test_two_doses_for_a_single_treatment(encoder):
    with pytest.raises(ValueError, match=r"'0.1\+0.2'.*'drug_a'"):
        encoder.encode(["drug_a"], ["0.1+0.2"])


@pytest.mark.parametrize(
    ("bad_dose", "what"),
    [
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
        (-np.inf, "NaN or infinite"),
        ("nan", "NaN or infinite"),
        (-0.5, "negative"),
        ("0.5+-1", "negative"),
        ("high", "not a number"),
        ("0.5+x", "not a number"),
        (None, "not a number"),
        ([1.0], "not a number"),
    ],
)
def test_bad_dose_is_named_with_its_column_and_treatment(encoder, bad_dose, what):
    doses = np.empty(2, dtype=object)
    doses[:] = [0.5, bad_dose]
    with pytest.raises(ValueError, match=what) as info:
        encoder.encode(
            ["drug_a", "drug_b" if "+" not in str(bad_dose) else "drug_a+drug_b"],
            doses,
            dose_column="conc",
        )
    message = str(info.value)
    assert "obs['conc']" in message
    assert "drug_b" in message
    assert repr(bad_dose) in message or str(bad_dose) in message


def test_zero_dose_of_treated_cell_is_allowed(encoder):
    idx, dose = encoder.encode(["drug_a"], [0.0])
    np.testing.assert_array_equal(_dense(encoder, idx, dose), [[0.0, 0.0, 0.0]])


def test_doses_length_mismatch(encoder):
    with pytest.raises(ValueError, match="one entry per treatment label"):
        encoder.encode(["drug_a", "drug_b"], [1.0])


@pytest.mark.parametrize("label", ["control+drug_a", "drug_a+control"])
def test_control_inside_a_combination(label):
    with pytest.raises(ValueError, match=f"{label.replace('+', '[+]')}.*control"):
        TreatmentEncoder.from_labels(["control", "drug_a", label], control="control")


def test_control_inside_a_combination_at_encoding(encoder):
    with pytest.raises(ValueError, match="'control'"):
        encoder.encode(["control+drug_a"], [1.0])


@pytest.mark.parametrize("label", ["drug_a+", "+drug_a", "drug_a++drug_b"])
def test_empty_part(label):
    with pytest.raises(ValueError, match="empty part"):
        TreatmentEncoder.from_labels(["control", label], control="control")


def test_repeated_part():
    with pytest.raises(ValueError, match=r"'drug_a\+drug_a'"):
        TreatmentEncoder.from_labels(["control", "drug_a+drug_a"], control="control")
