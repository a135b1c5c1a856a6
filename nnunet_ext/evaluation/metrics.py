"""The papers' segmentation metrics for one case: DSC, IoU, precision, recall, RVD, HD95 and ASSD (2D and 3D).

Definitions (``P`` prediction mask, ``G`` reference mask, ``|.|`` voxel count; DPC-Net paper Sec. 3.3, GODC/LFAM
paper Sec. IV-A, LiTS benchmark for RVD and ASSD):

- ``Dice = 2|P n G| / (|P| + |G|)``, ``IoU = |P n G| / |P u G|`` (exactly as ``nnUNetv2_evaluate_folder``),
- ``Precision = |P n G| / |P|``, ``Recall = |P n G| / |G|``,
- ``RVD = (|P| - |G|) / |G|`` (signed: > 0 over-segmentation; the LiTS definition, as a fraction, not percent),
- surface distances, in millimetres through the voxel spacing: the surface of a mask is its voxels that
  ``scipy.ndimage.binary_erosion`` with the face-connected structuring element removes (voxels on the image border
  count as surface), and ``d(x, S)`` is the Euclidean distance to the nearest surface voxel of ``S``, computed by
  ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``; this is MONAI's and medpy's surface
  (``benchmarks/surface_distance.py`` measures the agreement with MONAI and with SimpleITK).
  ``HD95 = max(P95{d(p, dG): p in dP}, P95{d(g, dP): g in dG})`` (MONAI's ``compute_hausdorff_distance(...,
  percentile=95)``: the larger of the two directed 95th percentiles, numpy's linear interpolation);
  ``ASSD = (sum_{p in dP} d(p, dG) + sum_{g in dG} d(g, dP)) / (|dP| + |dG|)``.

Conventions where the definitions divide by zero (documented in the README; ``NaN`` values are excluded from the
means by ``nnunet_ext.evaluation.evaluate`` and counted there per label and metric):

- both masks empty: every metric is ``NaN`` (nnU-Net's convention for Dice and IoU, so that means agree with
  ``nnUNetv2_evaluate_folder``); with ``both_empty="perfect"`` Dice, IoU, precision and recall are 1 and RVD, HD95
  and ASSD are 0 instead,
- one mask empty: Dice and IoU are 0; precision is ``NaN`` when the prediction is empty, recall and RVD are ``NaN``
  when the reference is empty (0/0 and x/0), HD95 and ASSD are ``NaN`` (no surface to measure to).

Ignore label (as nnU-Net): voxels whose reference is the ignore label are removed from both masks before anything is
counted or measured, so they are neither true nor false and carry no surface of the prediction.
Regions (nnU-Net's region-based training): a region is the union of its labels, in reference and prediction.
Arrays may carry singleton axes (nnU-Net reads a 2D image as ``(1, 1, H, W)``); axes of size 1 are dropped with their
spacing before the surfaces are computed, so a 2D image has 2D surfaces.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

METRICS = ("Dice", "IoU", "Precision", "Recall", "RVD", "HD95", "ASSD")
COUNTS = ("TP", "FP", "FN", "TN", "n_pred", "n_ref")
BOTH_EMPTY = ("nan", "perfect")
LabelOrRegion = Union[int, Tuple[int, ...]]


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else float("nan")


def _squeeze(mask: np.ndarray, spacing: Sequence[float]) -> Tuple[np.ndarray, Tuple[float, ...]]:
    if mask.ndim != len(spacing):
        raise ValueError(f"mask has {mask.ndim} axes but the spacing {tuple(spacing)} has {len(spacing)}")
    keep = [axis for axis, size in enumerate(mask.shape) if size > 1]
    return mask.reshape([mask.shape[a] for a in keep]), tuple(float(spacing[a]) for a in keep)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` removed by a face-connected erosion (outside the image counts as background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(mask_a: np.ndarray, mask_b: np.ndarray,
                      spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from every surface voxel of ``a`` to the surface of ``b``, and from ``b``'s to ``a``'s.

    Both masks must be non-empty. The work is done on the bounding box of ``a | b`` padded by one background voxel,
    which gives the same surfaces and distances as the whole image (all surface voxels lie in that box).
    """
    mask_a, spacing_a = _squeeze(np.asarray(mask_a, dtype=bool), spacing)
    mask_b, _ = _squeeze(np.asarray(mask_b, dtype=bool), spacing)
    if not mask_a.any() or not mask_b.any():
        raise ValueError("surface distances need two non-empty masks")
    box = ndimage.find_objects((mask_a | mask_b).astype(np.uint8))[0]
    edges_a = surface(np.pad(mask_a[box], 1))
    edges_b = surface(np.pad(mask_b[box], 1))
    to_b = ndimage.distance_transform_edt(~edges_b, sampling=spacing_a)
    to_a = ndimage.distance_transform_edt(~edges_a, sampling=spacing_a)
    return to_b[edges_a], to_a[edges_b]


def hd95(a_to_b: np.ndarray, b_to_a: np.ndarray) -> float:
    """The larger of the two directed 95th percentiles of the surface distances (MONAI's HD95)."""
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def assd(a_to_b: np.ndarray, b_to_a: np.ndarray) -> float:
    """Average symmetric surface distance: mean over both surfaces' distances to the other surface."""
    return float((a_to_b.sum() + b_to_a.sum()) / (a_to_b.size + b_to_a.size))


def mask_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                 ignore: Optional[np.ndarray] = None, both_empty: str = "nan") -> Dict[str, float]:
    """All metrics and nnU-Net's counts (TP, FP, FN, TN, n_pred, n_ref) of one binary prediction mask."""
    if both_empty not in BOTH_EMPTY:
        raise ValueError(f"both_empty must be one of {BOTH_EMPTY}, not {both_empty!r}")
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if ignore is not None:
        reference = reference & ~ignore
        prediction = prediction & ~ignore
    tp = int(np.count_nonzero(reference & prediction))
    n_pred, n_ref = int(np.count_nonzero(prediction)), int(np.count_nonzero(reference))
    fp, fn = n_pred - tp, n_ref - tp
    used = reference.size - (int(np.count_nonzero(ignore)) if ignore is not None else 0)
    result = {"TP": tp, "FP": fp, "FN": fn, "TN": used - tp - fp - fn, "n_pred": n_pred, "n_ref": n_ref}
    if n_pred == 0 and n_ref == 0:
        perfect = both_empty == "perfect"
        result.update({m: (1.0 if m in ("Dice", "IoU", "Precision", "Recall") else 0.0) if perfect else float("nan")
                       for m in METRICS})
        return result
    result.update({"Dice": 2 * tp / (2 * tp + fp + fn), "IoU": tp / (tp + fp + fn),
                   "Precision": _ratio(tp, n_pred), "Recall": _ratio(tp, n_ref), "RVD": _ratio(n_pred - n_ref, n_ref)})
    if n_pred and n_ref:
        a_to_b, b_to_a = surface_distances(prediction, reference, spacing)
        result.update({"HD95": hd95(a_to_b, b_to_a), "ASSD": assd(a_to_b, b_to_a)})
    else:
        result.update({"HD95": float("nan"), "ASSD": float("nan")})
    return result


def region_mask(segmentation: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    """``segmentation == label``, or the union of a region's labels."""
    if np.isscalar(label_or_region):
        return segmentation == label_or_region
    return np.isin(segmentation, np.asarray(label_or_region))


def case_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                 labels_or_regions: Iterable[LabelOrRegion], ignore_label: Optional[int] = None,
                 both_empty: str = "nan") -> Dict[LabelOrRegion, Dict[str, float]]:
    """``mask_metrics`` of every label or region of two label maps (same shape, ``spacing`` per axis in mm)."""
    ignore = reference == ignore_label if ignore_label is not None else None
    return {r: mask_metrics(region_mask(reference, r), region_mask(prediction, r), spacing, ignore, both_empty)
            for r in labels_or_regions}
