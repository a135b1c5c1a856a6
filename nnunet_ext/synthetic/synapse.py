"""Tiny synthetic abdominal CT in the exact on-disk layout of Synapse multi-organ (BTCV, MICCAI 2015).

The fixture of the Synapse converter tests and a learnable 2D dataset for DLKUNet's end-to-end
test, so it is small (32 x 32 voxels in-plane, 6-10 slices) and written in about a second. Layout,
as in the real ``RawData.zip``::

    <root>/RawData/Training/img/img0001.nii.gz     <root>/RawData/Training/label/label0001.nii.gz
    <root>/RawData/Testing/img/img0061.nii.gz      (no labels for the test images)

Quirks reproduced:

* the real case numbers: training 0001-0010 and 0021-0040 (no 0011-0020), test from 0061 on, four
  digits; images and labels are paired by the number, the TransUNet split names cases by it;
* gallbladder (label 4) absent in two of the 30 cases (``GALLBLADDER_ABSENT``; the real release
  has two such cases, the twin picks 0007 and 0029, one on each side of the TransUNet split);
* anisotropic slices of 2.5 to 5 mm (``SLICE_SPACINGS_MM``), in-plane 0.7-0.8 mm, sizes vary per case;
* the 13 BTCV labels (``nnunet_ext.dataset_conversion.synapse.BTCV_LABELS``), so that both the
  13-organ task and the 8-organ mapping are exercised.

Volumes are int16 Hounsfield units: air (-1000), an elliptic body (fat -100, soft tissue 30) and
13 organs as elliptic cylinders with per-case jitter of centre and size and a radius that shrinks
towards the ends of the volume; each organ has its own mean HU (``ORGANS``) plus Gaussian noise.
The organ layout is a caricature of an axial abdominal slice (patient's right on the image's
left), not anatomy. Labels are uint8 0..13; every organ other than an absent gallbladder has
voxels in every case. Everything is deterministic given the seed: each file draws from its own
``numpy.random.default_rng([seed, kind, number])``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the library's own alias)

from nnunet_ext.dataset_conversion.synapse import (
    IMAGE_PREFIX,
    LABEL_PREFIX,
    RAW_DATA,
    TEST_IMAGES,
    TRAINING_IMAGES,
    TRAINING_LABELS,
    TRAINING_NUMBERS,
)

TEST_NUMBERS = tuple(range(61, 81))
GALLBLADDER_ABSENT = (7, 29)
SLICE_SPACINGS_MM = (2.5, 3.0, 4.0, 5.0)
HU_AIR, HU_FAT, HU_SOFT_TISSUE = -1000, -100, 30
NOISE_SIGMA_HU = 10.0
_TRAINING_STREAM, _TEST_STREAM = 0, 1


@dataclass(frozen=True)
class Organ:
    """An organ as an elliptic cylinder: centre and radii in [-1, 1] image coordinates (x, y), mean HU."""

    label: int
    centre: tuple[float, float]
    radii: tuple[float, float]
    hu: int


# painted in this order (later organs overwrite earlier ones); labels as in BTCV_LABELS
ORGANS = (
    Organ(6, (-0.42, -0.08), (0.34, 0.40), 60),    # liver
    Organ(1, (0.55, 0.22), (0.20, 0.22), 45),      # spleen
    Organ(7, (0.30, -0.30), (0.24, 0.18), 15),     # stomach
    Organ(2, (-0.45, 0.48), (0.15, 0.20), 160),    # right kidney
    Organ(3, (0.45, 0.48), (0.15, 0.20), 160),     # left kidney
    Organ(4, (-0.30, -0.45), (0.14, 0.13), 0),     # gallbladder
    Organ(11, (0.12, 0.02), (0.24, 0.10), 90),     # pancreas
    Organ(10, (-0.10, -0.12), (0.14, 0.09), 130),  # portal and splenic vein
    Organ(5, (0.05, 0.66), (0.10, 0.10), 40),      # esophagus
    Organ(8, (0.13, 0.40), (0.11, 0.11), 220),     # aorta
    Organ(9, (-0.14, 0.36), (0.11, 0.11), 110),    # inferior vena cava
    Organ(12, (-0.30, 0.22), (0.09, 0.09), 75),    # right adrenal gland
    Organ(13, (0.30, 0.22), (0.09, 0.09), 75),     # left adrenal gland
)


def random_size(rng: np.random.Generator, in_plane: int) -> tuple[int, int, int]:
    """Image size (x, y, z): ``in_plane`` +- 2 voxels, 6-10 slices."""
    return (int(rng.integers(in_plane - 2, in_plane + 3)), int(rng.integers(in_plane - 2, in_plane + 3)),
            int(rng.integers(6, 11)))


def random_spacing(rng: np.random.Generator) -> tuple[float, float, float]:
    """In-plane 0.7-0.8 mm, slice spacing one of ``SLICE_SPACINGS_MM``."""
    in_plane = round(float(rng.uniform(0.7, 0.8)), 3)
    return in_plane, in_plane, float(rng.choice(SLICE_SPACINGS_MM))


def ct_volume(rng: np.random.Generator, size: tuple[int, int, int],
              gallbladder: bool) -> tuple[np.ndarray, np.ndarray]:
    """CT-like int16 HU volume and uint8 label (0..13), both as numpy (z, y, x) arrays."""
    nx, ny, nz = size
    z = np.linspace(-1.0, 1.0, nz)[:, None, None]
    y = np.linspace(-1.0, 1.0, ny)[None, :, None]
    x = np.linspace(-1.0, 1.0, nx)[None, None, :]
    shape = (nz, ny, nx)
    body = np.broadcast_to((x / 0.98) ** 2 + (y / 0.9) ** 2 <= 1.0, shape)
    hu = np.full(shape, HU_AIR, dtype=np.float64)
    hu[body] = HU_FAT
    hu[np.broadcast_to((x / 0.92) ** 2 + (y / 0.84) ** 2 <= 1.0, shape)] = HU_SOFT_TISSUE
    label = np.zeros(shape, dtype=np.uint8)
    for organ in ORGANS:
        if organ.label == 4 and not gallbladder:
            continue
        cx, cy = (c + rng.uniform(-0.04, 0.04) for c in organ.centre)
        rx, ry = (r * rng.uniform(0.9, 1.1) for r in organ.radii)
        taper = np.sqrt(1.0 - (z / rng.uniform(1.6, 2.0)) ** 2)  # radius shrinks towards the volume ends
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= taper ** 2
        # at least the voxel nearest to the centre of every slice, so that tiny organs never vanish
        inside = inside | ((np.abs(x - cx) <= 1.0 / nx) & (np.abs(y - cy) <= 1.0 / ny))
        inside = np.broadcast_to(inside, shape) & body
        hu[inside] = organ.hu
        label[inside] = organ.label
    hu += rng.normal(0.0, NOISE_SIGMA_HU, size=shape)
    return np.round(hu).clip(-1024, 3071).astype(np.int16), label


def write_nifti(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """Write a numpy (z, y, x) array as a compressed NIfTI file with a CT-like origin."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-12.0, -12.0, -150.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def write_case(image_path: Path, label_path: Path | None, rng: np.random.Generator, in_plane: int,
               gallbladder: bool) -> dict:
    """Write one image (and its label unless ``label_path`` is None); return size, spacing and labels."""
    size = random_size(rng, in_plane)
    spacing = random_spacing(rng)
    volume, label = ct_volume(rng, size, gallbladder)
    write_nifti(volume, spacing, image_path)
    if label_path is not None:
        write_nifti(label, spacing, label_path)
    return {"size": size, "spacing": spacing, "labels": sorted(int(v) for v in np.unique(label))}


def prepare_root(root: Path, overwrite: bool) -> None:
    """Create ``root``; refuse a non-empty one unless ``overwrite`` (then only ``RawData`` is replaced)."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to replace its "
                                  f"{RAW_DATA} folder")
        shutil.rmtree(root / RAW_DATA, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def make_synthetic_synapse(root: Path, num_test: int = 2, seed: int = 0, in_plane: int = 32,
                           training_numbers: tuple[int, ...] = TRAINING_NUMBERS, overwrite: bool = False) -> dict:
    """Generate the synthetic Synapse release under ``root`` (see the module docstring).

    ``num_test`` test images are numbered from 0061 on. Returns a dict with ``root``, ``raw_data``
    (the ``RawData`` folder a converter reads), ``training_cases``, ``test_cases``,
    ``gallbladder_absent`` (case numbers) and per case number ``sizes``, ``spacings`` (x, y, z) and
    ``labels`` (label values present), and ``test_sizes``.
    """
    if not 0 <= num_test <= len(TEST_NUMBERS):
        raise ValueError(f"num_test must be between 0 and {len(TEST_NUMBERS)}, got {num_test}")
    if in_plane < 16:
        raise ValueError(f"in_plane must be at least 16 voxels, got {in_plane}")
    root = Path(root)
    prepare_root(root, overwrite)
    raw = root / RAW_DATA
    for folder in (TRAINING_IMAGES, TRAINING_LABELS, TEST_IMAGES):
        (raw / folder).mkdir(parents=True)
    facts = {}
    for number in training_numbers:
        rng = np.random.default_rng([seed, _TRAINING_STREAM, number])
        facts[number] = write_case(raw / TRAINING_IMAGES / f"{IMAGE_PREFIX}{number:04d}.nii.gz",
                                   raw / TRAINING_LABELS / f"{LABEL_PREFIX}{number:04d}.nii.gz",
                                   rng, in_plane, gallbladder=number not in GALLBLADDER_ABSENT)
    test_numbers = TEST_NUMBERS[:num_test]
    test_facts = {number: write_case(raw / TEST_IMAGES / f"{IMAGE_PREFIX}{number:04d}.nii.gz", None,
                                     np.random.default_rng([seed, _TEST_STREAM, number]), in_plane, True)
                  for number in test_numbers}
    return {
        "root": root,
        "raw_data": raw,
        "training_cases": list(training_numbers),
        "test_cases": list(test_numbers),
        "gallbladder_absent": [n for n in training_numbers if 4 not in facts[n]["labels"]],
        "sizes": {n: f["size"] for n, f in facts.items()},
        "spacings": {n: f["spacing"] for n, f in facts.items()},
        "labels": {n: f["labels"] for n, f in facts.items()},
        "test_sizes": {n: f["size"] for n, f in test_facts.items()},
    }

