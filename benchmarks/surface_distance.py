"""HD95 and ASSD in mm: ``nnunet_ext.evaluation.metrics`` (scipy's EDT with ``sampling``) against MONAI and SimpleITK.

    python -m benchmarks.surface_distance                      # scipy and SimpleITK (both installed with nnU-Net)
    PYTHONPATH=/path/to/monai python -m benchmarks.surface_distance   # + MONAI (not a dependency of nnunet_ext)

Masks: smooth random blobs (Gaussian-filtered noise, thresholded) on 2D and 3D grids with anisotropic spacing; the
prediction is the reference shifted by a few voxels and dilated; both are kept 4 voxels off the image border (see
``make_case``). For each candidate:
HD95, ASSD, their largest relative difference to scipy's over the cases, and the median time per case (3 repeats).

- scipy: ``nnunet_ext.evaluation.metrics.mask_metrics`` (surface = mask minus its face-connected erosion,
  ``distance_transform_edt(~surface, sampling=spacing)`` on the union's bounding box),
- MONAI: ``compute_hausdorff_distance(percentile=95, spacing=...)`` and ``compute_average_surface_distance(
  symmetric=True, spacing=...)`` on one-hot tensors (the definitions the metrics module copies),
- SimpleITK: surface by ``LabelContour`` (face-connected), distances by ``SignedMaurerDistanceMap(useImageSpacing)``
  (absolute value) of the other mask read at the surface voxels; HD95 and ASSD formed as in the metrics module.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_ext.evaluation.metrics import assd, hd95, mask_metrics

CASES = (("2D 256x256", (256, 256), (0.6, 0.9)),
         ("3D 48x128x128", (48, 128, 128), (2.5, 0.8, 0.8)),
         ("3D 96x192x192", (96, 192, 192), (1.5, 0.7, 0.7)))


def make_case(shape, seed: int):
    rng = np.random.default_rng(seed)
    reference = ndimage.gaussian_filter(rng.random(shape), sigma=[s / 12 for s in shape]) > 0.5
    shift = tuple(int(v) for v in rng.integers(1, 4, len(shape)))
    prediction = ndimage.binary_dilation(np.roll(reference, shift, axis=tuple(range(len(shape)))), iterations=1)
    inner = tuple(slice(4, -4) for _ in shape)      # off the image border: SimpleITK's LabelContour does not count
    for mask in (reference, prediction):            # border voxels as surface, scipy's erosion and MONAI's do
        border = np.ones(shape, dtype=bool)
        border[inner] = False
        mask[border] = False
    return reference, prediction


def scipy_candidate(reference, prediction, spacing):
    m = mask_metrics(reference, prediction, spacing)
    return m["HD95"], m["ASSD"]


def monai_candidate(reference, prediction, spacing):
    import torch
    from monai.metrics.hausdorff_distance import compute_hausdorff_distance
    from monai.metrics.surface_distance import compute_average_surface_distance

    def one_hot(mask):
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))
    p, r = one_hot(prediction), one_hot(reference)
    return (float(compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))),
            float(compute_average_surface_distance(p, r, symmetric=True, spacing=list(spacing))))


def sitk_candidate(reference, prediction, spacing):
    def image(mask):
        img = sitk.GetImageFromArray(mask.astype(np.uint8))
        img.SetSpacing(tuple(float(s) for s in reversed(spacing)))   # SimpleITK's spacing is x, y(, z)
        return img

    def distances(a, b):   # from a's surface voxels to b's surface
        surface_a = sitk.GetArrayFromImage(sitk.LabelContour(image(a), fullyConnected=False)).astype(bool)
        distance_b = sitk.GetArrayFromImage(sitk.Abs(sitk.SignedMaurerDistanceMap(
            sitk.LabelContour(image(b), fullyConnected=False), squaredDistance=False, useImageSpacing=True,
            insideIsPositive=False)))
        return distance_b[surface_a]
    p_to_r, r_to_p = distances(prediction, reference), distances(reference, prediction)
    return hd95(p_to_r, r_to_p), assd(p_to_r, r_to_p)


def candidates():
    found = {"scipy EDT (nnunet_ext)": scipy_candidate, "SimpleITK Maurer": sitk_candidate}
    try:
        import monai
        found[f"MONAI {monai.__version__}"] = monai_candidate
    except ImportError:
        print("MONAI is not importable: left out (put it on PYTHONPATH to compare)")
    return found


def timed(fn, *args, repeats=3):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="random cases per grid")
    args = parser.parse_args(argv)
    methods = candidates()
    print(f"{'grid':16}{'candidate':26}{'HD95 mm':>10}{'ASSD mm':>10}{'max rel. diff HD95':>20}"
          f"{'ASSD':>8}{'median s/case':>15}")
    for name, shape, spacing in CASES:
        cases = [make_case(shape, seed) for seed in range(args.seeds)]
        reference_values = None
        for method, fn in methods.items():
            values, times = [], []
            for reference, prediction in cases:
                value, seconds = timed(fn, reference, prediction, spacing)
                values.append(value)
                times.append(seconds)
            values = np.array(values)
            if reference_values is None:
                reference_values = values
            diff = np.abs(values - reference_values).max(axis=0) / np.abs(reference_values).max(axis=0)
            print(f"{name:16}{method:26}{values[:, 0].mean():>10.3f}{values[:, 1].mean():>10.3f}"
                  f"{diff[0]:>20.2e}{diff[1]:>8.2e}{statistics.median(times):>15.3f}")


if __name__ == "__main__":
    main()
