"""The metrics of ``nnunet_ext.evaluation.metrics`` against hand-computed values on small 2D and 3D masks."""
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from nnunet_ext.evaluation.metrics import (METRICS, case_metrics, mask_metrics, surface, surface_distances)


def square_2d(rows, cols, shape=(16, 16)):
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_overlap_metrics_hand_computed():
    # reference 3x3 (9 voxels), prediction 3x4 shifted right by one column: TP 6, FP 6, FN 3
    reference = square_2d((2, 5), (2, 5))
    prediction = square_2d((2, 5), (3, 7))
    m = mask_metrics(reference, prediction, spacing=(2.0, 0.5))
    assert (m["TP"], m["FP"], m["FN"], m["TN"], m["n_pred"], m["n_ref"]) == (6, 6, 3, 256 - 15, 12, 9)
    assert m["Dice"] == pytest.approx(12 / 21)
    assert m["IoU"] == pytest.approx(6 / 15)
    assert m["Precision"] == pytest.approx(0.5)
    assert m["Recall"] == pytest.approx(2 / 3)
    assert m["RVD"] == pytest.approx(1 / 3)
    assert mask_metrics(prediction, reference, spacing=(2.0, 0.5))["RVD"] == pytest.approx(-0.25)


def test_shift_2d_anisotropic_known_hd95_assd():
    # a 3x3 square shifted by 8 columns of 0.5 mm (no overlap): surface voxels of column c are (10 - c) * 0.5 mm
    # from the other square's first column: 3 voxels at 4.0, 2 at 3.5 (centre is not surface), 3 at 3.0 mm
    reference = square_2d((2, 5), (2, 5))
    prediction = square_2d((2, 5), (10, 13))
    m = mask_metrics(reference, prediction, spacing=(2.0, 0.5))
    assert m["ASSD"] == pytest.approx((3 * 4.0 + 2 * 3.5 + 3 * 3.0) / 8)
    # 95th percentile of [3,3,3,3.5,3.5,4,4,4] (linear interpolation at index 6.65) = 4.0, in both directions
    assert m["HD95"] == pytest.approx(4.0)
    assert m["Dice"] == 0 and m["IoU"] == 0 and m["Precision"] == 0 and m["Recall"] == 0
    # the same shift along the 2 mm axis (rows): 8 rows x 2 mm -> 3 voxels at 16, 2 at 14, 3 at 12 mm
    m = mask_metrics(square_2d((2, 5), (2, 5)), square_2d((10, 13), (2, 5)), spacing=(2.0, 0.5))
    assert m["ASSD"] == pytest.approx((3 * 16 + 2 * 14 + 3 * 12) / 8)
    assert m["HD95"] == pytest.approx(16.0)


def test_shift_3d_anisotropic_known_hd95_assd():
    # a 3x3x3 cube shifted by 5 slices of 3 mm: layer z of the surface is (5 - z) * 3 mm from the other cube's
    # first layer: 9 voxels at 15, 8 at 12 (centre excluded), 9 at 9 mm
    reference = np.zeros((10, 6, 6), dtype=bool)
    prediction = np.zeros_like(reference)
    reference[0:3, 1:4, 1:4] = True
    prediction[5:8, 1:4, 1:4] = True
    m = mask_metrics(reference, prediction, spacing=(3.0, 0.7, 0.7))
    assert m["ASSD"] == pytest.approx((9 * 15 + 8 * 12 + 9 * 9) / 26)
    # 26 distances, index 0.95 * 25 = 23.75 lies in the block of 15 mm
    assert m["HD95"] == pytest.approx(15.0)


def test_hd95_interpolates_between_distances():
    # one-voxel-wide lines (every voxel is surface) along the rows; the prediction has a 1 mm shift except for its
    # last voxel, shifted by 5 mm: 9 distances of 1 mm and one larger (> 1), in both directions
    reference = np.zeros((10, 12), dtype=bool)
    prediction = np.zeros_like(reference)
    reference[:, 0] = True
    prediction[:9, 1] = True
    prediction[9, 5] = True
    a_to_b, b_to_a = surface_distances(prediction, reference, (1.0, 1.0))
    assert sorted(a_to_b) == pytest.approx([1.0] * 9 + [5.0])
    assert sorted(b_to_a) == pytest.approx([1.0] * 9 + [math.sqrt(1 + 1)])   # (9,0) -> (8,1)
    m = mask_metrics(reference, prediction, spacing=(1.0, 1.0))
    # P95 of nine 1s and a 5: index 8.55 -> 1 + 0.55 * 4 = 3.2; the other direction: 1 + 0.55 * (sqrt 2 - 1)
    assert m["HD95"] == pytest.approx(3.2)
    assert m["ASSD"] == pytest.approx((9 + 5 + 9 + math.sqrt(2)) / 20)


@pytest.mark.parametrize("shape,spacing", [((14, 18), (0.6, 1.7)), ((9, 12, 11), (2.5, 0.8, 1.1))])
def test_surface_distances_equal_brute_force(shape, spacing):
    """The distance transform equals the pairwise distances between surface voxel coordinates (in mm)."""
    rng = np.random.default_rng(0)
    from scipy import ndimage
    a = ndimage.binary_opening(rng.random(shape) > 0.55)
    b = ndimage.binary_opening(rng.random(shape) > 0.5)
    a_to_b, b_to_a = surface_distances(a, b, spacing)
    points_a = np.argwhere(surface(a)) * np.asarray(spacing)
    points_b = np.argwhere(surface(b)) * np.asarray(spacing)
    pairwise = cdist(points_a, points_b)
    np.testing.assert_allclose(a_to_b, pairwise.min(axis=1))
    np.testing.assert_allclose(b_to_a, pairwise.min(axis=0))


def test_singleton_axis_is_dropped():
    """nnU-Net reads a 2D image as (1, H, W) with a dummy spacing: same numbers as the 2D masks."""
    reference, prediction = square_2d((2, 5), (2, 5)), square_2d((2, 5), (10, 13))
    m2 = mask_metrics(reference, prediction, spacing=(2.0, 0.5))
    m3 = mask_metrics(reference[None], prediction[None], spacing=(999.0, 2.0, 0.5))
    assert m3 == m2


def test_empty_mask_conventions():
    empty, square = np.zeros((8, 8), dtype=bool), square_2d((2, 5), (2, 5), shape=(8, 8))
    both = mask_metrics(empty, empty, (1.0, 1.0))
    assert all(math.isnan(both[m]) for m in METRICS)
    perfect = mask_metrics(empty, empty, (1.0, 1.0), both_empty="perfect")
    assert [perfect[m] for m in METRICS] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    missed = mask_metrics(square, empty, (1.0, 1.0))      # reference has the object, prediction is empty
    assert (missed["Dice"], missed["IoU"], missed["Recall"], missed["RVD"]) == (0.0, 0.0, 0.0, -1.0)
    assert math.isnan(missed["Precision"]) and math.isnan(missed["HD95"]) and math.isnan(missed["ASSD"])
    spurious = mask_metrics(empty, square, (1.0, 1.0))    # nothing to find, something predicted
    assert (spurious["Dice"], spurious["IoU"], spurious["Precision"]) == (0.0, 0.0, 0.0)
    assert math.isnan(spurious["Recall"]) and math.isnan(spurious["RVD"]) and math.isnan(spurious["HD95"])
    with pytest.raises(ValueError, match="both_empty"):
        mask_metrics(empty, empty, (1.0, 1.0), both_empty="one")


def test_labels_regions_and_ignore_label():
    reference = np.zeros((8, 10), dtype=np.uint8)
    reference[1:4, 1:4] = 1          # 9 voxels of label 1
    reference[5:7, 5:9] = 2          # 8 voxels of label 2
    reference[0, :] = 3              # ignore label: row 0
    prediction = np.zeros_like(reference)
    prediction[0:4, 1:4] = 1         # label 1 plus 3 voxels in the ignored row
    prediction[5:7, 5:7] = 2         # half of label 2 ...
    prediction[5:7, 7:9] = 1         # ... the other half predicted as label 1
    spacing = (1.0, 1.0)
    result = case_metrics(reference, prediction, spacing, [1, 2, (1, 2)], ignore_label=3)
    assert list(result) == [1, 2, (1, 2)]
    # label 1: the ignored row does not count; the 4 voxels of label 2 predicted as 1 are false positives
    assert (result[1]["TP"], result[1]["FP"], result[1]["FN"]) == (9, 4, 0)
    assert result[1]["TN"] == 70 - 13
    assert result[1]["Dice"] == pytest.approx(18 / 22)
    # label 2: half found
    assert (result[2]["TP"], result[2]["FP"], result[2]["FN"]) == (4, 0, 4)
    assert result[2]["Recall"] == pytest.approx(0.5) and result[2]["Precision"] == pytest.approx(1.0)
    # region (1, 2): the union is perfectly predicted outside the ignored row
    region = result[(1, 2)]
    assert (region["TP"], region["FP"], region["FN"]) == (17, 0, 0)
    assert region["Dice"] == 1.0 and region["HD95"] == 0.0 and region["ASSD"] == 0.0
    # without the ignore label, the three predicted voxels of row 0 are false positives of label 1
    assert case_metrics(reference, prediction, spacing, [1])[1]["FP"] == 7
    # a label subset
    assert list(case_metrics(reference, prediction, spacing, [2])) == [2]


def test_overlapping_cubes_3d_hand_computed():
    # 3x3x3 cubes, the prediction one 3 mm slice further: TP 18, FP 9, FN 9. Surface distances from the reference:
    # its first layer (9 voxels) is 3 mm from the prediction's first layer, its middle ring (8) and last ring (8) lie
    # on the prediction's surface (0), its last layer's centre is 0.7 mm from the prediction's ring; same both ways
    reference = np.zeros((6, 5, 5), dtype=bool)
    prediction = np.zeros_like(reference)
    reference[0:3, 1:4, 1:4] = True
    prediction[1:4, 1:4, 1:4] = True
    m = mask_metrics(reference, prediction, spacing=(3.0, 0.7, 0.7))
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (18, 9, 9, 150 - 36)
    assert m["Dice"] == pytest.approx(2 / 3) and m["IoU"] == pytest.approx(0.5)
    assert m["Precision"] == pytest.approx(2 / 3) and m["Recall"] == pytest.approx(2 / 3) and m["RVD"] == 0
    a_to_b, b_to_a = surface_distances(prediction, reference, (3.0, 0.7, 0.7))
    assert sorted(a_to_b) == pytest.approx([0.0] * 16 + [0.7] + [3.0] * 9)
    assert sorted(b_to_a) == pytest.approx([0.0] * 16 + [0.7] + [3.0] * 9)
    assert m["ASSD"] == pytest.approx((9 * 3.0 + 0.7) / 26)
    assert m["HD95"] == pytest.approx(3.0)
