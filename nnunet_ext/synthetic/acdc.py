"""Tiny synthetic cardiac cine MRI in the exact on-disk layout of ACDC (Bernard et al., IEEE TMI 2018).

The fixture of the ACDC converter tests and a learnable 2D dataset for DLKUNet's end-to-end test,
so it is small (32 x 32 voxels in-plane, 6-10 short-axis slices, 6-12 cine frames). Layout, as in
the public release::

    <root>/database/training/patient001/Info.cfg
                                        patient001_4d.nii.gz             (x, y, z, t cine)
                                        patient001_frame01.nii.gz        (ED frame)
                                        patient001_frame01_gt.nii.gz
                                        patient001_frame04.nii.gz        (ES frame)
                                        patient001_frame04_gt.nii.gz
    <root>/database/testing/patient101/...                                (same files)
    <root>/database/{training,testing}/MANDATORY_CITATION.md              (a file among the patient folders)

``Info.cfg`` holds ``ED``, ``ES``, ``Group``, ``Height``, ``NbFrame`` and ``Weight`` lines
(``ED: 1``), frame numbers 1-based and zero padded to two digits in file names. Training patients
are numbered from 001, testing patients from 101. The testing folders carry ``_gt`` files too by
default, as we understand the current public release to have them (``test_labels=False``: the 2017
challenge layout without them); nnU-Net's conversion ignores them.

Quirks reproduced, so that only a converter that reads ``Info.cfg`` gets the frames right:

* ES varies between patients and the ED frame is 1 except in ``LATE_ED_PATIENT``
  (ED frame 2), so frame numbers in file names cannot be guessed;
* the cine ``_4d`` file holds every frame, the ED/ES frame files are copies of two of its frames;
* anisotropic slices (5-10 mm) and in-plane spacing 1.37-1.68 mm varying per patient.

Images are float32 MRI-like intensities: background tissue (100), blood pools bright (250), the
myocardium dark (60) and lungs dark (20), plus Gaussian noise. Labels are uint8: 0 background,
1 RV cavity, 2 myocardium, 3 LV cavity (``nnunet_ext.dataset_conversion.acdc.ACDC_LABELS``). The LV
cavity shrinks and the myocardium thickens from ED to ES. Deterministic given the seed: each
patient draws from ``numpy.random.default_rng([seed, number])``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the library's own alias)

from nnunet_ext.dataset_conversion.acdc import (
    DATABASE,
    INFO_FILE,
    TESTING,
    TRAINING,
    cine_name,
    frame_name,
    patient_name,
)

GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
LATE_ED_PATIENT = 3
CITATION_FILE = "MANDATORY_CITATION.md"
INTENSITY_TISSUE, INTENSITY_BLOOD, INTENSITY_MYOCARDIUM, INTENSITY_LUNG = 100.0, 250.0, 60.0, 20.0
NOISE_SIGMA = 12.0


def cardiac_phase(frame: int, ed: int, es: int, num_frames: int) -> float:
    """Contraction in [0, 1]: 0 at ED, 1 at ES, a cosine between them and back to ED after the last frame."""
    if ed <= frame <= es:
        return 0.5 - 0.5 * np.cos(np.pi * (frame - ed) / (es - ed))
    after_es = (frame - es) % num_frames
    return 0.5 + 0.5 * np.cos(np.pi * after_es / ((ed - es) % num_frames))


def heart_frame(rng: np.random.Generator, shape: tuple[int, int, int], contraction: float,
                centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """MRI-like float32 volume and uint8 label (numpy z, y, x) of one cine frame."""
    nz, ny, nx = shape
    z = np.linspace(-1.0, 1.0, nz)[:, None, None]
    y = np.linspace(-1.0, 1.0, ny)[None, :, None]
    x = np.linspace(-1.0, 1.0, nx)[None, None, :]
    apex_taper = np.sqrt(np.clip(1.0 - ((z + 0.2) / 1.5) ** 2, 0.2, 1.0))  # smaller towards the apex
    lv_radius = (0.30 - 0.10 * contraction) * apex_taper
    wall = 0.10 + 0.04 * contraction
    lv_distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2)
    rv_distance = np.sqrt(((x - centre[0] + 0.42) / 1.2) ** 2 + ((y - centre[1]) / 0.9) ** 2)
    lv = lv_distance <= lv_radius
    myocardium = (lv_distance <= lv_radius + wall) & ~lv
    rv = (rv_distance <= (0.30 - 0.06 * contraction) * apex_taper) & (lv_distance > lv_radius + wall)
    lungs = (np.abs(x) >= 0.75) & (np.abs(y) <= 0.7)

    image = np.full(shape, INTENSITY_TISSUE)
    label = np.zeros(shape, dtype=np.uint8)
    for mask, value, intensity in ((np.broadcast_to(lungs, shape), 0, INTENSITY_LUNG),
                                   (rv, 1, INTENSITY_BLOOD), (myocardium, 2, INTENSITY_MYOCARDIUM),
                                   (lv, 3, INTENSITY_BLOOD)):
        image[mask] = intensity
        label[mask] = value
    image += rng.normal(0.0, NOISE_SIGMA, size=shape)
    return np.clip(image, 0, None).astype(np.float32), label


def info_text(ed: int, es: int, group: str, num_frames: int, rng: np.random.Generator) -> str:
    """``Info.cfg`` contents as in ACDC (keys in alphabetical order, one ``Key: value`` per line)."""
    return (f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: {rng.uniform(150, 195):.1f}\n"
            f"NbFrame: {num_frames}\nWeight: {rng.uniform(50, 110):.1f}\n")


def with_geometry(image: sitk.Image, spacing: tuple[float, ...]) -> sitk.Image:
    """Set the spacing (and a scanner-like origin) on ``image``."""
    image.SetSpacing(spacing)
    image.SetOrigin((-25.0, -25.0, 0.0, 0.0)[:image.GetDimension()])
    return image


def write_patient(folder: Path, number: int, seed: int, in_plane: int, with_labels: bool) -> dict:
    """Write one patient folder; return its ED, ES, number of frames, size and spacing."""
    rng = np.random.default_rng([seed, number])
    name = patient_name(number)
    num_frames = int(rng.integers(6, 13))
    ed = 2 if number == LATE_ED_PATIENT else 1
    es = int(rng.integers(ed + 2, num_frames))
    shape = (int(rng.integers(6, 11)), int(rng.integers(in_plane - 2, in_plane + 3)),
             int(rng.integers(in_plane - 2, in_plane + 3)))
    in_plane_mm = round(float(rng.uniform(1.37, 1.68)), 3)
    spacing = (in_plane_mm, in_plane_mm, float(rng.choice([5.0, 6.5, 8.0, 10.0])))
    centre = (float(rng.uniform(-0.05, 0.1)), float(rng.uniform(-0.1, 0.1)))
    frames = [heart_frame(rng, shape, cardiac_phase(f, ed, es, num_frames), centre)
              for f in range(1, num_frames + 1)]

    folder = folder / name
    folder.mkdir(parents=True)
    (folder / INFO_FILE).write_text(info_text(ed, es, GROUPS[number % len(GROUPS)], num_frames, rng))
    cine = sitk.GetImageFromArray(np.stack([image for image, _ in frames]), isVector=False)  # (t, z, y, x)
    sitk.WriteImage(with_geometry(cine, (*spacing, 1.0)), str(folder / cine_name(name)), useCompression=True)
    for frame in (ed, es):
        image, label = frames[frame - 1]
        sitk.WriteImage(with_geometry(sitk.GetImageFromArray(image), spacing), str(folder / frame_name(name, frame)),
                        useCompression=True)
        if with_labels:
            sitk.WriteImage(with_geometry(sitk.GetImageFromArray(label), spacing),
                            str(folder / frame_name(name, frame, gt=True)), useCompression=True)
    return {"ed": ed, "es": es, "num_frames": num_frames, "size": shape[::-1], "spacing": spacing}


def prepare_root(root: Path, overwrite: bool) -> None:
    """Create ``root``; refuse a non-empty one unless ``overwrite`` (then only ``database`` is replaced)."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to replace its "
                                  f"{DATABASE} folder")
        shutil.rmtree(root / DATABASE, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def make_synthetic_acdc(root: Path, num_training: int = 10, num_test: int = 2, seed: int = 0, in_plane: int = 32,
                        test_labels: bool = True, overwrite: bool = False) -> dict:
    """Generate the synthetic ACDC release under ``root`` (see the module docstring).

    Returns a dict with ``root``, ``database`` (the folder a converter reads), ``training_patients``
    and ``test_patients`` (numbers) and per patient number ``ed``, ``es``, ``num_frames``, ``sizes``
    and ``spacings`` (x, y, z).
    """
    if not 1 <= num_training <= 100 or not 0 <= num_test <= 50:
        raise ValueError(f"need 1 <= num_training <= 100 and 0 <= num_test <= 50, got {num_training}, {num_test}")
    if in_plane < 16:
        raise ValueError(f"in_plane must be at least 16 voxels, got {in_plane}")
    root = Path(root)
    prepare_root(root, overwrite)
    database = root / DATABASE
    facts = {}
    for subset, numbers, labelled in ((TRAINING, range(1, num_training + 1), True),
                                      (TESTING, range(101, 101 + num_test), test_labels)):
        (database / subset).mkdir(parents=True)
        (database / subset / CITATION_FILE).write_text("Cite Bernard et al., IEEE TMI 37(11), 2018.\n")
        for number in numbers:
            facts[number] = write_patient(database / subset, number, seed, in_plane, labelled)
    return {
        "root": root,
        "database": database,
        "training_patients": list(range(1, num_training + 1)),
        "test_patients": list(range(101, 101 + num_test)),
        **{key: {n: f[key] for n, f in facts.items()} for key in ("ed", "es", "num_frames")},
        "sizes": {n: f["size"] for n, f in facts.items()},
        "spacings": {n: f["spacing"] for n, f in facts.items()},
    }

