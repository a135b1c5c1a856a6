"""Tiny synthetic kidney ultrasound release in the layout of the Open Kidney Ultrasound Data Set (kidneyUS).

The fixture of the kidneyUS converter tests (about 48 x 64 px per image, written in well under a
second). Layout, as in the real release::

    <root>/images/<n>_<DICOM id>_anon.png
    <root>/labels/reviewed_masks_{1,2}/{capsule,regions}/<n>_<DICOM id>_anon.png
    <root>/labels/reviewed_labels_{1,2}.csv      (VGG Image Annotator export of the same polygons)

Images are B-mode scans (:mod:`nnunet_ext.synthetic.ultrasound_abdominal`) of a kidney: hypoechoic
cortex (3), darker medulla (2) and a bright central echo complex (1) inside the capsule, in a sector
of grey tissue. Masks are uint8 L PNGs: capsule {0, 1}, regions {0, 1, 2, 3}, the rasterised
polygons of the CSV. The two annotators trace the same kidney with slightly different polygons.

Quirks of the real data reproduced (numbers and DICOM ids taken from the real release):

* sizes differ per image (four sizes with the real aspect ratios 3:4 and 5:8);
* some images are RGB with grey content, the others 8-bit grey;
* ``DUPLICATE_WITHOUT_IMAGES``: one DICOM id (second underscore field) under three file names; all
  three have masks from both annotators, only the highest number has an image, as in the
  514-image release of the 534 annotated files;
* ``DUPLICATE_WITH_IMAGES``: one DICOM id under two names that both have an image (a release of
  all 534 files);
* ``EMPTY_CASE``: empty capsule and regions masks from both annotators (and a CSV row with
  ``region_count`` 0), like ``299_IM-0068-0001``; ``EMPTY_REGIONS_CASE``: a capsule but empty
  regions, from annotator 1 only.

Everything is deterministic given the seed: each case draws from ``default_rng([seed, number])``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from nnunet_ext.dataset_conversion.kidneyus import ANATOMY, ANNOTATORS, LABELS_CSV, MASKS_FOLDER
from nnunet_ext.synthetic.ultrasound_abdominal import (
    as_rgb,
    bmode,
    echo_map,
    organ_polygon,
    prepare_root,
    random_fan,
    rasterise,
)

IMAGES = "images"
LABELS = "labels"
GENERATED = (IMAGES, LABELS)
SIZES = ((48, 64), (45, 60), (40, 64), (54, 72))
UNIQUE_CASES = ((1, "IM-0001-0059"), (10, "IM-0415-0078"), (12, "IM-0464-17664"), (100, "IM-0246-0030"),
                (115, "IM-0474-0001-0002"), (130, "IM-0650-0033"), (130, "IM-0650-0053"), (203, "IM-0186-0002"))
DUPLICATE_WITHOUT_IMAGES = ((110, "IM-0026-0001"), (402, "IM-0026-0001"), (414, "IM-0026-0001"))
DUPLICATE_WITH_IMAGES = ((164, "IM-0055-0009"), (599, "IM-0055-0009"))
EMPTY_CASE = (299, "IM-0068-0001")
EMPTY_REGIONS_CASE = 12
ECHO = {"tissue": 0.2, "capsule": 0.2, "cortex": 0.11, "medulla": 0.05, "central_echo_complex": 0.55}
REGION_SCALES = (("Cortex", 0.9), ("Medulla", 0.68), ("Central Echo Complex", 0.38))


def file_name(number: int, dicom_id: str) -> str:
    """The real naming: ``<number>_<DICOM id>_anon.png``."""
    return f"{number}_{dicom_id}_anon.png"


def kidney_polygons(rng: np.random.Generator, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Integer ``(x, y)`` polygons of the capsule and the regions nested in it (scaled copies around its centre)."""
    rows, cols = shape
    centre = np.array([cols * rng.uniform(0.42, 0.58), rows * rng.uniform(0.5, 0.62)])
    capsule = organ_polygon(rng, tuple(centre), (cols * rng.uniform(0.24, 0.3), rows * rng.uniform(0.17, 0.22)),
                            num_points=20, ripple=0.08)
    polygons = {"Capsule": capsule}
    for anatomy, scale in REGION_SCALES:
        polygons[anatomy] = centre + scale * (capsule - centre)
    return {anatomy: np.round(points).astype(int) for anatomy, points in polygons.items()}


def masks_of(polygons: dict[str, np.ndarray], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Capsule and regions masks as the release has them (regions painted outside in)."""
    capsule = [(polygons["Capsule"], 1)] if "Capsule" in polygons else []
    regions = [(polygons[anatomy], ANATOMY[anatomy][1]) for anatomy, _ in REGION_SCALES if anatomy in polygons]
    return {"capsule": rasterise(capsule, shape), "regions": rasterise(regions, shape)}


def jitter(rng: np.random.Generator, polygons: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The second annotator's tracing: every vertex moved by up to one pixel."""
    return {anatomy: points + rng.integers(-1, 2, size=points.shape) for anatomy, points in polygons.items()}


def via_rows(name: str, file_size: int, polygons: dict[str, np.ndarray]) -> list[list]:
    """CSV rows of one image in the VGG Image Annotator export format of ``reviewed_labels_N.csv``."""
    attributes = json.dumps({"Quality": "Fair", "View": "Longitudinal", "Comments": "n/a"}, separators=(",", ":"))
    if not polygons:
        return [[name, file_size, attributes, 0, 0, "{}", "{}"]]
    return [[name, file_size, attributes, len(polygons), index,
             json.dumps({"name": "polygon", "all_points_x": points[:, 0].tolist(),
                         "all_points_y": points[:, 1].tolist()}, separators=(",", ":")),
             json.dumps({"Anatomy": anatomy}, separators=(",", ":"))]
            for index, (anatomy, points) in enumerate(polygons.items())]


def write_case(root: Path, number: int, dicom_id: str, seed: int, with_image: bool,
               empty_for: tuple[int, ...], empty_regions_for: tuple[int, ...]) -> dict:
    """Write one image (if ``with_image``) and both annotators' masks; return the case facts and CSV rows."""
    rng = np.random.default_rng([seed, number, int(dicom_id.replace("IM", "").replace("-", ""))])
    shape = SIZES[int(rng.integers(len(SIZES)))]
    polygons = kidney_polygons(rng, shape)
    masks = masks_of(polygons, shape)
    name = file_name(number, dicom_id)
    image_path = root / IMAGES / name
    regions = [(masks["capsule"] == 1, ECHO["capsule"])]
    regions += [(masks["regions"] == value, ECHO[label]) for label, value in
                (("cortex", 3), ("medulla", 2), ("central_echo_complex", 1))]
    grey = bmode(rng, echo_map(shape, regions, ECHO["tissue"]), random_fan(rng, shape))
    rgb = bool(rng.integers(2))
    if with_image:
        Image.fromarray(as_rgb(grey) if rgb else grey).save(image_path)
    facts = {"shape": shape, "rgb": rgb, "csv_rows": {}, "masks": {}}
    for annotator in ANNOTATORS:
        traced = polygons if annotator == 1 else jitter(rng, polygons)
        if annotator in empty_for:
            traced = {}
        elif annotator in empty_regions_for:
            traced = {"Capsule": traced["Capsule"]}
        annotator_masks = masks_of(traced, shape)
        for task, mask in annotator_masks.items():
            Image.fromarray(mask, mode="L").save(root / LABELS / MASKS_FOLDER.format(annotator=annotator) / task / name)
        file_size = image_path.stat().st_size if with_image else 0
        facts["csv_rows"][annotator] = via_rows(name, file_size, traced)
        facts["masks"][annotator] = annotator_masks
    return facts


def make_synthetic_kidneyus(root: Path, seed: int = 0, overwrite: bool = False) -> dict:
    """Generate the synthetic kidneyUS release under ``root`` (see the module docstring).

    Returns a dict with ``root``; ``names`` (every annotated file name), ``image_names`` (those with
    an image); ``duplicate_without_images``/``duplicate_with_images``/``empty_case`` (file names);
    ``empty_regions_case`` (file name, annotator 1); per file name ``shapes`` ((rows, cols)), ``rgb``
    (bool) and ``masks`` ({annotator: {task: uint8 array}}).
    """
    root = Path(root)
    prepare_root(root, overwrite, GENERATED)
    (root / IMAGES).mkdir()
    for annotator in ANNOTATORS:
        for task in ("capsule", "regions"):
            (root / LABELS / MASKS_FOLDER.format(annotator=annotator) / task).mkdir(parents=True)
    without_image = set(DUPLICATE_WITHOUT_IMAGES[:-1])
    cases = sorted(UNIQUE_CASES + DUPLICATE_WITHOUT_IMAGES + DUPLICATE_WITH_IMAGES + (EMPTY_CASE,))
    facts = {}
    for number, dicom_id in cases:
        facts[file_name(number, dicom_id)] = write_case(
            root, number, dicom_id, seed, with_image=(number, dicom_id) not in without_image,
            empty_for=ANNOTATORS if (number, dicom_id) == EMPTY_CASE else (),
            empty_regions_for=(1,) if number == EMPTY_REGIONS_CASE else ())
    for annotator in ANNOTATORS:
        with open(root / LABELS / LABELS_CSV.format(annotator=annotator), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "file_size", "file_attributes", "region_count", "region_id",
                             "region_shape_attributes", "region_attributes"])
            for name in facts:
                writer.writerows(facts[name]["csv_rows"][annotator])
    names = list(facts)
    return {
        "root": root,
        "names": names,
        "image_names": [file_name(*case) for case in cases if case not in without_image],
        "duplicate_without_images": [file_name(*case) for case in DUPLICATE_WITHOUT_IMAGES],
        "duplicate_with_images": [file_name(*case) for case in DUPLICATE_WITH_IMAGES],
        "empty_case": file_name(*EMPTY_CASE),
        "empty_regions_case": next(name for name in names if name.startswith(f"{EMPTY_REGIONS_CASE}_")),
        "shapes": {name: f["shape"] for name, f in facts.items()},
        "rgb": {name: f["rgb"] for name, f in facts.items()},
        "masks": {name: f["masks"] for name, f in facts.items()},
    }
