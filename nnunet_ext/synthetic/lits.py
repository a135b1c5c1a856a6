"""Tiny synthetic CT dataset in the exact on-disk layout of LiTS (Liver Tumor Segmentation).

It is the embedded default of the demo and the fixture of the converter tests, so it is small
(about 40 x 40 x 24 voxels per case) and generated in well under a second. Layout, as in the real
LiTS release::

    <root>/Training Batch 1/volume-N.nii, segmentation-N.nii   (low case numbers)
    <root>/Training Batch 2/volume-N.nii, segmentation-N.nii   (high case numbers)
    <root>/LITS-Challenge-Test-Data/test-volume-N.nii

Files are uncompressed ``.nii`` and numbers are not zero padded. With the defaults the training
numbers are 0, 1, 2, 3 (batch 1) and 8, 9, 10, 11 (batch 2): the gap and the two-digit numbers
make lexicographic order, numeric order and enumeration index disagree, so only pairing by the
number in the file name is right. Test numbers are 0 .. num_test - 1 (they overlap the training
numbers, as in LiTS, where ``test-volume-0.nii`` also matches a careless ``*volume-0.nii`` glob).

Volumes are int16 Hounsfield units: air (-1000) around an elliptic body with a fat rim (-100),
soft tissue (10), a vertebra (500), a smooth liver blob (60) and 0-2 hypodense tumours (25)
inside the liver, plus Gaussian noise. Labels are uint8: 0 background, 1 liver, 2 tumour.
Every case whose index in the training list is 1 modulo 4 has no tumour (cases 1 and 9 by
default), as some LiTS cases do.

Geometry is anisotropic (in-plane 0.7-0.9 mm, slices 2.0/2.5/3.0 mm) with a LiTS-like origin and
a flipped z axis (direction diag(1, 1, -1)). Two LiTS quirks are reproduced:

* ``identity_affine_case`` (the first batch-2 case, 8 by default, if batch 2 has at least two
  cases): volume *and* segmentation carry an identity geometry (spacing 1, origin 0, identity
  direction), like LiTS volumes 28-47. It is consistent and must convert without a warning.
* ``identity_label_case`` (the last training case, 11 by default, if there are at least two):
  only the segmentation carries the identity geometry while its volume does not, like LiTS
  ``segmentation-53``. A converter must copy the volume geometry onto the label.

Everything is deterministic given the seed: each file draws from its own
``numpy.random.default_rng([seed, kind, number])``.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TRAINING_BATCH_1 = "Training Batch 1"
TRAINING_BATCH_2 = "Training Batch 2"
TEST_FOLDER = "LITS-Challenge-Test-Data"
GENERATED_FOLDERS = (TRAINING_BATCH_1, TRAINING_BATCH_2, TEST_FOLDER)

HU_AIR, HU_FAT, HU_SOFT_TISSUE, HU_LIVER, HU_TUMOUR, HU_BONE = -1000, -100, 10, 60, 25, 500
NOISE_SIGMA_HU = 10.0
FLIPPED_Z_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_TRAINING_STREAM, _TEST_STREAM = 0, 1


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of one image, in SimpleITK (x, y, z) order."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on ``image`` and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


IDENTITY_GEOMETRY = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY_DIRECTION)


def training_case_numbers(num_training: int) -> tuple[list[int], list[int]]:
    """Case numbers of batch 1 and batch 2: ``0 .. n1-1`` and ``2*n1 .. 2*n1 + n2 - 1``.

    ``n1 = ceil(num_training / 2)``; the gap between the batches keeps case numbers apart from
    positions in the list.
    """
    n1 = math.ceil(num_training / 2)
    batch_1 = list(range(n1))
    batch_2 = list(range(2 * n1, 2 * n1 + num_training - n1))
    return batch_1, batch_2


def random_size(rng: np.random.Generator) -> tuple[int, int, int]:
    """A tiny varied image size (x, y, z) around 40 x 40 x 24."""
    return int(rng.integers(36, 45)), int(rng.integers(36, 45)), int(rng.integers(20, 29))


def random_geometry(rng: np.random.Generator, size: tuple[int, int, int]) -> Geometry:
    """Anisotropic CT-like geometry with a LiTS-like origin and a flipped z axis."""
    in_plane = round(float(rng.uniform(0.7, 0.9)), 3)
    slice_spacing = float(rng.choice([2.0, 2.5, 3.0]))
    origin = (round(float(rng.uniform(-190, -160)), 2), round(float(rng.uniform(-190, -160)), 2),
              round(float(rng.uniform(-420, -340)), 2))
    return Geometry((in_plane, in_plane, slice_spacing), origin, FLIPPED_Z_DIRECTION)


def normalised_grid(size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates in [-1, 1] along x, y, z as arrays broadcastable to numpy (z, y, x) shape."""
    nx, ny, nz = size
    z = np.linspace(-1.0, 1.0, nz)[:, None, None]
    y = np.linspace(-1.0, 1.0, ny)[None, :, None]
    x = np.linspace(-1.0, 1.0, nx)[None, None, :]
    return x, y, z


def liver_mask(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A smooth, irregular blob on the patient's right, shaped by low-frequency ripples."""
    centre = (rng.uniform(-0.4, -0.3), rng.uniform(-0.15, 0.0), rng.uniform(-0.15, 0.15))
    radii = (rng.uniform(0.35, 0.45), rng.uniform(0.35, 0.42), rng.uniform(0.55, 0.7))
    phases = rng.uniform(0, 2 * np.pi, size=2)
    distance = (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                + ((z - centre[2]) / radii[2]) ** 2)
    ripple = 0.15 * np.sin(5 * x + phases[0]) * np.cos(4 * y + 3 * z + phases[1])
    return distance + ripple <= 1.0


def tumour_mask(rng: np.random.Generator, liver: np.ndarray, count: int,
                spacing: tuple[float, float, float]) -> np.ndarray:
    """``count`` small spheres centred on random liver voxels, clipped to the liver."""
    tumours = np.zeros_like(liver)
    liver_voxels = np.argwhere(liver)
    zz, yy, xx = np.indices(liver.shape)
    for _ in range(count):
        cz, cy, cx = liver_voxels[rng.integers(len(liver_voxels))]
        radius_mm = rng.uniform(2.5, 4.0) * spacing[0]
        distance_mm = np.sqrt(((xx - cx) * spacing[0]) ** 2 + ((yy - cy) * spacing[1]) ** 2
                              + ((zz - cz) * spacing[2]) ** 2)
        tumours |= distance_mm <= radius_mm
    return tumours & liver


def ct_volume(rng: np.random.Generator, size: tuple[int, int, int], num_tumours: int,
              spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """CT-like int16 HU volume and uint8 label (0/1/2), both as numpy (z, y, x) arrays."""
    x, y, z = normalised_grid(size)
    shape = (size[2], size[1], size[0])
    body = np.broadcast_to((x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1.0, shape)
    inner = np.broadcast_to((x / 0.8) ** 2 + (y / 0.6) ** 2 <= 1.0, shape)
    spine = np.broadcast_to(x ** 2 + (y - 0.45) ** 2 <= 0.12 ** 2, shape)
    liver = np.broadcast_to(liver_mask(rng, x, y, z), shape) & inner & ~spine
    tumours = tumour_mask(rng, liver, num_tumours, spacing)

    hu = np.full(shape, HU_AIR, dtype=np.float64)
    hu[body] = HU_FAT
    hu[inner] = HU_SOFT_TISSUE
    hu[spine] = HU_BONE
    hu[liver] = HU_LIVER
    hu[tumours] = HU_TUMOUR
    hu += rng.normal(0.0, NOISE_SIGMA_HU, size=shape)

    label = np.zeros(shape, dtype=np.uint8)
    label[liver] = 1
    label[tumours] = 2
    return np.round(hu).clip(-1024, 3071).astype(np.int16), label


def write_nifti(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a numpy (z, y, x) array with ``geometry`` as an uncompressed NIfTI file."""
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(array)), str(path), useCompression=False)


def write_training_case(folder: Path, number: int, seed: int, tumour_free: bool,
                        identity_volume: bool, identity_label: bool) -> dict:
    """Write ``volume-N.nii`` and ``segmentation-N.nii`` into ``folder``; return the case facts."""
    rng = np.random.default_rng([seed, _TRAINING_STREAM, number])
    size = random_size(rng)
    geometry = random_geometry(rng, size)
    num_tumours = 0 if tumour_free else int(rng.integers(1, 3))
    volume, label = ct_volume(rng, size, num_tumours, geometry.spacing)
    volume_geometry = IDENTITY_GEOMETRY if identity_volume else geometry
    label_geometry = IDENTITY_GEOMETRY if identity_label else volume_geometry
    write_nifti(volume, volume_geometry, folder / f"volume-{number}.nii")
    write_nifti(label, label_geometry, folder / f"segmentation-{number}.nii")
    return {"size": size, "spacing": volume_geometry.spacing, "has_tumour": bool((label == 2).any())}


def write_test_case(folder: Path, number: int, seed: int) -> dict:
    """Write ``test-volume-N.nii`` into ``folder``; return the case facts."""
    rng = np.random.default_rng([seed, _TEST_STREAM, number])
    size = random_size(rng)
    geometry = random_geometry(rng, size)
    volume, _ = ct_volume(rng, size, int(rng.integers(0, 3)), geometry.spacing)
    write_nifti(volume, geometry, folder / f"test-volume-{number}.nii")
    return {"size": size, "spacing": geometry.spacing}


def prepare_root(root: Path, overwrite: bool) -> None:
    """Create ``root``; refuse a non-empty one unless ``overwrite``.

    With ``overwrite`` only the generator's own folders are removed; nothing else is touched.
    """
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to replace "
                                  f"the generated folders {', '.join(GENERATED_FOLDERS)}")
        for name in GENERATED_FOLDERS:
            if (root / name).is_dir():
                shutil.rmtree(root / name)
    root.mkdir(parents=True, exist_ok=True)


def make_synthetic_lits(root: Path, num_training: int = 8, num_test: int = 2, seed: int = 0,
                        overwrite: bool = False) -> dict:
    """Generate the synthetic LiTS dataset under ``root`` (see the module docstring).

    Returns a dict with ``root``, ``training_cases`` (numbers, batch 1 then batch 2),
    ``batches`` (folder name -> numbers), ``test_cases``, ``identity_label_case`` and
    ``identity_affine_case`` (numbers or None), ``tumour_free_cases``, and per case number
    ``sizes`` and ``spacings`` (x, y, z) for training and ``test_sizes``/``test_spacings``.
    """
    if num_training < 1 or num_test < 0:
        raise ValueError(f"need num_training >= 1 and num_test >= 0, got {num_training}, {num_test}")
    root = Path(root)
    prepare_root(root, overwrite)
    batch_1, batch_2 = training_case_numbers(num_training)
    training = batch_1 + batch_2
    identity_label_case = training[-1] if num_training >= 2 else None
    identity_affine_case = batch_2[0] if len(batch_2) >= 2 else None

    facts = {}
    for index, number in enumerate(training):
        folder = root / (TRAINING_BATCH_1 if number in batch_1 else TRAINING_BATCH_2)
        folder.mkdir(exist_ok=True)
        facts[number] = write_training_case(folder, number, seed, tumour_free=index % 4 == 1,
                                            identity_volume=number == identity_affine_case,
                                            identity_label=number == identity_label_case)
    test_facts = {}
    if num_test:
        (root / TEST_FOLDER).mkdir(exist_ok=True)
    for number in range(num_test):
        test_facts[number] = write_test_case(root / TEST_FOLDER, number, seed)

    return {
        "root": root,
        "training_cases": training,
        "batches": {TRAINING_BATCH_1: batch_1, TRAINING_BATCH_2: batch_2},
        "test_cases": list(range(num_test)),
        "identity_label_case": identity_label_case,
        "identity_affine_case": identity_affine_case,
        "tumour_free_cases": [n for n in training if not facts[n]["has_tumour"]],
        "sizes": {n: facts[n]["size"] for n in training},
        "spacings": {n: facts[n]["spacing"] for n in training},
        "test_sizes": {n: test_facts[n]["size"] for n in test_facts},
        "test_spacings": {n: test_facts[n]["spacing"] for n in test_facts},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of ``nnunet_ext_make_synthetic_lits``."""
    parser = argparse.ArgumentParser(
        prog="nnunet_ext_make_synthetic_lits",
        description="Write a tiny synthetic CT dataset in the real LiTS folder layout.")
    parser.add_argument("out", type=Path, help="output folder (must be empty or absent)")
    parser.add_argument("--training", type=int, default=8, help="number of training cases (default 8)")
    parser.add_argument("--test", type=int, default=2, help="number of test volumes (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the generated folders in a non-empty OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_make_synthetic_lits OUT [--training N] [--test N] [--seed S]``."""
    args = parse_args(argv)
    try:
        info = make_synthetic_lits(args.out, args.training, args.test, args.seed, args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"Wrote synthetic LiTS to {info['root']}: training cases {info['training_cases']}, "
          f"test cases {info['test_cases']}, identity-geometry label: case {info['identity_label_case']}")


if __name__ == "__main__":
    main()
