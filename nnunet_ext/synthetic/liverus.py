"""Tiny synthetic release in the layout of the Annotated Ultrasound Liver images (Xu et al., Kaggle mirror).

The fixture of the liver US converter tests (56-72 x 64-88 px per image). Layout, as in the real
release (one zip per class, extracted)::

    <root>/Benign/image/<n>.jpg                    <root>/Benign/segmentation/{liver,mass,outline}/<n>.json
    <root>/Malignant/Malignant/image/<n>.jpg       <root>/Malignant/Malignant/segmentation/{liver,mass,outline}/<n>.json
    <root>/Normal/image/<n>.jpg                    <root>/Normal/segmentation/{liver,outline}/<n>.json

Each polygon file is a JSON list of ``[x, y]`` float points. Images are RGB JPEGs with grey content
showing a B-mode scan (:mod:`nnunet_ext.synthetic.ultrasound_abdominal`) of a large liver with, in
benign and malignant cases, a mass inside it (hyperechoic for benign, hypoechoic for malignant);
``outline`` traces the scan fan.

Quirks reproduced (numbers as in the real release where it has the quirk):

* ``Malignant`` sits one folder deeper (``Malignant/Malignant/...``), as some unzippers make it;
* the numbers 1 and 2 exist in every class, so numbers collide across classes;
* ``Malignant/229``: no ``liver`` file; its liver polygon was saved as ``outline`` (the release's
  mistake for images 229 and 306);
* ``Malignant/374``: no liver polygon at all (only mass and outline), as in the release;
* images sizes differ per image; ``Normal`` has no ``mass`` folder.

Everything is deterministic given the seed: each image draws from ``default_rng([seed, class, number])``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from nnunet_ext.dataset_conversion.liverus import CLASSES, IMAGE_FOLDER, LIVER, MASS, OUTLINE, SEGMENTATION_FOLDER
from nnunet_ext.synthetic.ultrasound_abdominal import (
    as_rgb,
    bmode,
    echo_map,
    organ_polygon,
    prepare_root,
    random_fan,
    rasterise,
)

NUMBERS = {"Benign": (1, 2, 3), "Malignant": (1, 2, 229, 374), "Normal": (1, 2)}
NESTED_CLASS = "Malignant"
LIVER_IN_OUTLINE = ("Malignant", 229)
NO_LIVER = ("Malignant", 374)
SIZES = ((56, 64), (60, 80), (64, 72), (72, 88))
ECHO = {"tissue": 0.2, "liver": 0.5, "Benign": 1.2, "Malignant": 0.08}


def class_folder(root: Path, class_name: str) -> Path:
    """Where a class's ``image`` and ``segmentation`` folders are (one level deeper for ``NESTED_CLASS``)."""
    return root / class_name / class_name if class_name == NESTED_CLASS else root / class_name


def write_polygon(path: Path, points: np.ndarray) -> None:
    """A polygon as the release stores it: a JSON list of ``[x, y]`` float points."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(points.tolist()))


def write_case(folder: Path, class_name: str, number: int, seed: int) -> dict:
    """Write one image and its polygon files; return its shape and label maps (liver, liver + mass)."""
    rng = np.random.default_rng([seed, CLASSES.index(class_name), number])
    shape = SIZES[int(rng.integers(len(SIZES)))]
    rows, cols = shape
    fan = random_fan(rng, shape)
    liver = organ_polygon(rng, (cols * rng.uniform(0.4, 0.5), rows * rng.uniform(0.45, 0.55)),
                          (cols * rng.uniform(0.28, 0.33), rows * rng.uniform(0.26, 0.32)))
    liver = np.round(np.clip(liver, 0, [cols - 1, rows - 1]), 1)
    polygons = [(liver, 1)]
    if class_name != "Normal":
        centre = liver.mean(axis=0) + rng.uniform(-0.05, 0.05, size=2) * [cols, rows]
        polygons.append((np.round(organ_polygon(rng, tuple(centre), (cols * 0.09, rows * 0.08), num_points=12), 1), 2))
    liver_mass = rasterise(polygons, shape)
    echo = echo_map(shape, [(liver_mass == 1, ECHO["liver"])] + [(liver_mass == 2, ECHO.get(class_name, 0.0))],
                    ECHO["tissue"])
    Image.fromarray(as_rgb(bmode(rng, echo, fan))).save(folder / IMAGE_FOLDER / f"{number}.jpg", quality=95)
    segmentation = folder / SEGMENTATION_FOLDER
    key = (class_name, number)
    if key == LIVER_IN_OUTLINE:
        write_polygon(segmentation / OUTLINE / f"{number}.json", liver)
    else:
        write_polygon(segmentation / OUTLINE / f"{number}.json", fan.outline())
        if key != NO_LIVER:
            write_polygon(segmentation / LIVER / f"{number}.json", liver)
    if len(polygons) > 1:
        write_polygon(segmentation / MASS / f"{number}.json", polygons[1][0])
    return {"shape": shape, "liver": rasterise(polygons[:1], shape), "liver_mass": liver_mass}


def make_synthetic_liverus(root: Path, seed: int = 0, overwrite: bool = False) -> dict:
    """Generate the synthetic liver US release under ``root`` (see the module docstring).

    Returns a dict with ``root``, ``numbers`` ({class: numbers}), ``class_folders`` ({class: folder}),
    ``liver_in_outline`` and ``no_liver`` ((class, number)), and per (class, number) ``shapes``
    ((rows, cols)) and ``labels`` ({"liver": map, "liver_mass": map}, uint8, as the converter should paint
    them; also for the image without a liver polygon, whose liver the release lacks).
    """
    root = Path(root)
    prepare_root(root, overwrite, CLASSES)
    shapes, labels, folders = {}, {}, {}
    for class_name in CLASSES:
        folders[class_name] = class_folder(root, class_name)
        (folders[class_name] / IMAGE_FOLDER).mkdir(parents=True)
        for number in NUMBERS[class_name]:
            facts = write_case(folders[class_name], class_name, number, seed)
            shapes[class_name, number] = facts["shape"]
            labels[class_name, number] = {"liver": facts["liver"], "liver_mass": facts["liver_mass"]}
    return {"root": root, "numbers": dict(NUMBERS), "class_folders": folders, "liver_in_outline": LIVER_IN_OUTLINE,
            "no_liver": NO_LIVER, "shapes": shapes, "labels": labels}
