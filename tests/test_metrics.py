"""Metrics against cases whose values are worked out by hand.

MONAI's surface of a mask is the set of its voxels with at least one 6-neighbour outside it
(mask XOR erosion); distances are Euclidean between voxel centres in mm. MONAI computes in
float32, so values that are exact in decimal (0.9, 0.2) come back with float32 rounding: the
tolerance below (1e-6 absolute on values of order 1) is float32 resolution, not slack.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

from medpretrain.errors import DataError
from medpretrain.evaluation import case_metrics, summarize

TOL = 1e-6


def _vol(shape=(30, 30, 30)):
    return np.zeros(shape, dtype=np.uint8)


def test_dice_of_two_overlapping_cubes_is_exact():
    label, pred = _vol(), _vol()
    label[5:15, 5:15, 5:15] = 1  # 1000 voxels
    pred[10:20, 5:15, 5:15] = 1  # 1000 voxels, 500 shared
    m = case_metrics(pred, label, [1], spacing=(1, 1, 1))[1]
    assert m["dice"] == pytest.approx(2 * 500 / 2000, abs=TOL)
    assert m["pred_voxels"] == 1000 and m["label_voxels"] == 1000


def test_plate_shifted_one_voxel_along_x_with_anisotropic_spacing():
    # A 10x10 plate, one voxel thick in z: every voxel is a surface voxel. Shifted by one voxel
    # along x (2 mm): 90 of the 100 predicted voxels coincide with label voxels (distance 0), the
    # leading row of 10 is 2 mm from the label's last row; the same holds the other way round.
    label, pred = _vol(), _vol()
    label[10:20, 10:20, 10] = 1
    pred[11:21, 10:20, 10] = 1
    spacing = (2.0, 1.0, 1.0)
    m = case_metrics(pred, label, [1], spacing=spacing, nsd_tolerance_mm=2.5)[1]
    assert m["dice"] == pytest.approx(0.9, abs=TOL)
    # ASSD: 200 distances, 20 of them 2 mm -> 40 / 200.
    assert m["assd"] == pytest.approx(0.2, abs=TOL)
    # HD95 per direction: quantile 0.95 of 90 zeros and 10 twos sits at rank 94.05 -> 2 mm.
    assert m["hd95"] == pytest.approx(2.0, abs=TOL)
    # All distances <= 2 mm < 2.5 mm tolerance.
    assert m["nsd"] == pytest.approx(1.0, abs=TOL)
    # At 1 mm only the 2 x 90 coinciding voxels count: 180 / 200.
    m1 = case_metrics(pred, label, [1], spacing=spacing, nsd_tolerance_mm=1.0)[1]
    assert m1["nsd"] == pytest.approx(0.9, abs=TOL)


def test_cube_shifted_one_voxel_along_x_with_anisotropic_spacing():
    # Label: cube of side 10 at x' in [0, 9]; prediction: x' in [1, 10] (local coordinates),
    # spacing (2, 1, 1) so the shift is 2 mm. Each surface has 1000 - 8**3 = 488 voxels.
    # Distances from the predicted surface to the label surface:
    #   - 9 * 36 = 324 voxels on the y/z side faces with x' in 1..9 are label surface voxels: 0;
    #   - the 100 voxels of the leading face x' = 10 are 2 mm from the label face x' = 9;
    #   - the 64 voxels inside the trailing face x' = 1 are min(2, d_side) mm from the label,
    #     where d_side (1 mm steps) is the distance to a side face: the ring of 28 voxels next to
    #     a side face is 1 mm away, the inner 36 are 2 mm (the label face x' = 0) away.
    # So 324 zeros, 28 ones, 136 twos: mean 300 / 488; by mirror symmetry the other direction
    # has the same distribution, so the symmetric ASSD is 600 / 976 = 300 / 488 mm.
    # HD95: rank 0.95 * 487 = 462.65 falls in the twos (ranks 352..487) -> 2 mm.
    label, pred = _vol(), _vol()
    label[10:20, 10:20, 10:20] = 1
    pred[11:21, 10:20, 10:20] = 1
    spacing = (2.0, 1.0, 1.0)
    m = case_metrics(pred, label, [1], spacing=spacing, nsd_tolerance_mm=2.5)[1]
    assert m["dice"] == pytest.approx(0.9, abs=TOL)  # 2 * 900 / 2000
    assert m["assd"] == pytest.approx(300 / 488, abs=TOL)
    assert m["hd95"] == pytest.approx(2.0, abs=TOL)
    assert m["nsd"] == pytest.approx(1.0, abs=TOL)  # tolerance larger than the 2 mm shift
    # At 1.5 mm the 324 + 28 voxels within 1 mm count on each side: 352 / 488.
    m15 = case_metrics(pred, label, [1], spacing=spacing, nsd_tolerance_mm=1.5)[1]
    assert m15["nsd"] == pytest.approx(352 / 488, abs=TOL)


def test_spacing_scales_distances():
    # Same plate shift with isotropic 1 mm voxels: the shift is 1 mm, ASSD 0.1 mm, HD95 1 mm.
    label, pred = _vol(), _vol()
    label[10:20, 10:20, 10] = 1
    pred[11:21, 10:20, 10] = 1
    m = case_metrics(pred, label, [1], spacing=(1, 1, 1))[1]
    assert m["assd"] == pytest.approx(0.1, abs=TOL)
    assert m["hd95"] == pytest.approx(1.0, abs=TOL)


def test_empty_case_conventions():
    shape = (20, 30, 40)
    spacing = (2.0, 1.0, 0.5)
    diagonal = math.sqrt(40.0**2 + 30.0**2 + 20.0**2)
    label, pred = _vol(shape), _vol(shape)
    label[5:10, 5:10, 5:10] = 1  # class 1 only in the label
    pred[12:15, 5:10, 5:10] = 3  # class 3 only in the prediction; class 2 in neither
    m = case_metrics(pred, label, [1, 2, 3], spacing=spacing)
    assert m[2] == {"dice": 1.0, "nsd": 1.0, "assd": 0.0, "hd95": 0.0, "pred_voxels": 0.0, "label_voxels": 0.0}
    for c in (1, 3):
        assert m[c]["dice"] == 0.0 and m[c]["nsd"] == 0.0
        assert m[c]["assd"] == pytest.approx(diagonal) and m[c]["hd95"] == pytest.approx(diagonal)
    assert m[1]["label_voxels"] == 125 and m[1]["pred_voxels"] == 0
    assert m[3]["pred_voxels"] == 75 and m[3]["label_voxels"] == 0


def test_multi_class():
    label, pred = _vol(), _vol()
    label[2:8, 2:8, 2:8] = 1
    pred[2:8, 2:8, 2:8] = 1  # class 1 perfect
    label[10:20, 10:20, 10] = 2
    pred[11:21, 10:20, 10] = 2  # class 2: the plate case above
    m = case_metrics(pred, label, [1, 2], spacing=(2, 1, 1), nsd_tolerance_mm=1.0)
    assert set(m) == {1, 2}
    assert set(m[1]) == {"dice", "nsd", "assd", "hd95", "pred_voxels", "label_voxels"}
    assert m[1]["dice"] == pytest.approx(1.0) and m[1]["nsd"] == pytest.approx(1.0)
    assert m[1]["assd"] == 0.0 and m[1]["hd95"] == 0.0
    assert m[2]["dice"] == pytest.approx(0.9, abs=TOL)
    assert m[2]["nsd"] == pytest.approx(0.9, abs=TOL)
    assert m[2]["assd"] == pytest.approx(0.2, abs=TOL)
    assert all(isinstance(v, float) for c in m.values() for v in c.values())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_cropping_matches_monai_on_full_volume_near_the_border():
    # Objects touching the volume border: the crop must give the very same surfaces.
    rng = np.random.default_rng(0)
    label = (rng.random((24, 20, 16)) > 0.4).astype(np.uint8)
    label[:, :, 8:] = 0
    pred = np.roll(label, 1, axis=0)
    spacing = (1.5, 1.0, 2.0)
    m = case_metrics(pred, label, [1], spacing=spacing, nsd_tolerance_mm=1.2)[1]
    yp = torch.from_numpy(pred == 1)[None, None].float()
    y = torch.from_numpy(label == 1)[None, None].float()
    ref_assd = compute_average_surface_distance(yp, y, include_background=True, symmetric=True, spacing=spacing)
    ref_hd = compute_hausdorff_distance(yp, y, include_background=True, percentile=95, spacing=spacing)
    ref_nsd = compute_surface_dice(yp, y, [1.2], include_background=True, spacing=spacing)
    assert m["assd"] == pytest.approx(float(ref_assd), abs=TOL)
    assert m["hd95"] == pytest.approx(float(ref_hd), abs=TOL)
    assert m["nsd"] == pytest.approx(float(ref_nsd), abs=TOL)


def test_shape_mismatch_is_a_data_error():
    with pytest.raises(DataError):
        case_metrics(_vol((10, 10, 10)), _vol((10, 10, 11)), [1], spacing=(1, 1, 1))
    with pytest.raises(DataError):
        case_metrics(_vol(), _vol(), [1], spacing=(1, 1))


def test_summarize_numbers():
    per_case = {
        "a": {1: {"dice": 0.8, "nsd": 0.9, "assd": 1.0, "hd95": 3.0}, 2: {"dice": 0.6, "nsd": 0.7, "assd": 2.0, "hd95": 5.0}},
        "b": {1: {"dice": 0.9, "nsd": 1.0, "assd": 0.5, "hd95": 2.0}, 2: {"dice": 0.4, "nsd": 0.5, "assd": 4.0, "hd95": 9.0}},
        "c": {1: {"dice": 0.7, "nsd": 0.8, "assd": 1.5, "hd95": 4.0}, 2: {"dice": 0.2, "nsd": 0.3, "assd": 6.0, "hd95": 13.0}},
    }
    s = summarize(per_case, {1: "liver", 2: "vessel"})
    assert s["n_cases"] == 3
    assert list(s["classes"]) == ["liver", "vessel"]
    d1 = s["classes"]["liver"]["dice"]
    assert d1["mean"] == pytest.approx(0.8)
    assert d1["std"] == pytest.approx(0.1)  # sample std of 0.8, 0.9, 0.7
    assert d1["median"] == pytest.approx(0.8)
    assert d1["min"] == pytest.approx(0.7) and d1["max"] == pytest.approx(0.9)
    h2 = s["classes"]["vessel"]["hd95"]
    assert h2["mean"] == pytest.approx(9.0) and h2["std"] == pytest.approx(4.0)
    # Overall: per-case means over classes: dice 0.7, 0.65, 0.45 -> mean 0.6, sample std 0.1322876
    assert s["overall"]["dice"]["mean"] == pytest.approx(0.6)
    assert s["overall"]["dice"]["std"] == pytest.approx(np.std([0.7, 0.65, 0.45], ddof=1))
    assert s["overall"]["assd"]["mean"] == pytest.approx(np.mean([1.5, 2.25, 3.75]))
    assert set(s["overall"]["hd95"]) == {"mean", "std"}


def test_summarize_single_case_has_zero_std_and_default_names():
    s = summarize({"only": {3: {"dice": 0.5, "nsd": 0.6, "assd": 1.0, "hd95": 2.0}}}, {})
    assert s["n_cases"] == 1
    assert s["classes"]["class_3"]["dice"] == {"mean": 0.5, "std": 0.0, "median": 0.5, "min": 0.5, "max": 0.5}
    assert s["overall"]["nsd"] == {"mean": 0.6, "std": 0.0}
