"""Tiny synthetic release in the layout of the US simulation and segmentation dataset (Kaggle ussimandsegm).

The fixture of the US simulation converter tests and the learnable liver dataset of the SPA-DCN-Net
end-to-end test: 48 x 64 px per image (the real ones are 480 x 640), 10 annotated AUS training
images. Layout, as in the real release::

    <root>/abdominal_US/abdominal_US/AUS/images/{train,test}/<stem>.<png|jpg>
    <root>/abdominal_US/abdominal_US/AUS/annotations/{train,test}/<stem>.<png|jpg>
    <root>/abdominal_US/abdominal_US/RUS/images/{train,test}/<stem>.<png|jpg>
    <root>/abdominal_US/abdominal_US/RUS/annotations/test/<stem>.png      (no annotations/train)

AUS images are simulated, RUS images real in the release; here both are B-mode scans
(:mod:`nnunet_ext.synthetic.ultrasound_abdominal`) of a caricature of a right-upper-quadrant view:
a large liver (bright, parenchymal), a hypoechoic kidney, a pancreas, an anechoic vessel and in
some cases an anechoic gallbladder and a bright rib, all clipped to the scan fan. Annotations are RGB colour codes
(:data:`nnunet_ext.dataset_conversion.ussim.ORGAN_COLOURS`), background (0, 0, 0) inside the scan
fan and (10, 10, 10) outside it, so both background colours occur.

Quirks reproduced (``quirks`` in the returned dict names the stem of each):

* ``jpg_image``: an image stored as ``.jpg`` while its annotation is ``.png`` (pair by stem);
* ``jpeg_annotation``: an annotation stored as JPEG, whose colours are no longer exact (within
  about 30 of the palette in RGB distance: quality 95 without chroma subsampling);
* ``rgba_annotation``: an RGBA annotation (opaque);
* ``grey_annotation``: an annotation saved as 8-bit grey (ITU-R 601 luminance of the colours, as
  PIL's ``convert("L")`` and OpenCV's grey reader make it);
* ``RUS`` has no ``annotations/train``: its training images are unlabelled;
* images are RGB with grey content (the real PNGs are 3-channel); RUS images are JPEG.

Everything is deterministic given the seed: each image draws from
``default_rng([seed, subset, split, index])``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nnunet_ext.dataset_conversion.ussim import ANNOTATIONS, BACKGROUND_COLOURS, IMAGES, ORGAN_COLOURS, RELEASE
from nnunet_ext.synthetic.ultrasound_abdominal import (
    as_rgb,
    bmode,
    echo_map,
    organ_polygon,
    prepare_root,
    random_fan,
    rasterise,
)

SHAPE = (48, 64)
ORGANS = tuple(ORGAN_COLOURS)
ECHO = {"liver": 0.6, "kidney": 0.08, "pancreas": 0.32, "vessels": 0.02, "gallbladder": 0.02, "bones": 1.5}
LAYOUT = {  # subset -> split -> (number of images, annotated)
    "AUS": {"train": (10, True), "test": (2, True)},
    "RUS": {"train": (2, False), "test": (3, True)},
}
QUIRKS = {"jpg_image": ("AUS", "train", 1), "jpeg_annotation": ("AUS", "train", 2),
          "rgba_annotation": ("AUS", "train", 3), "grey_annotation": ("AUS", "train", 4)}


def stem_of(subset: str, index: int) -> str:
    """Stem of the ``index``-th image: ``ct<volume>-<slice>`` for AUS (simulated from CT), ``us<n>`` for RUS."""
    return f"ct{index // 3 + 1}-{index % 3 * 7 + 3}" if subset == "AUS" else f"us{index + 1:03d}"


def organ_labels(rng: np.random.Generator) -> np.ndarray:
    """Organ index map (0 background, ``ORGANS.index(name) + 1``), organs drawn back to front."""
    rows, cols = SHAPE
    organ = {name: index + 1 for index, name in enumerate(ORGANS)}
    polygons = [(organ_polygon(rng, (cols * rng.uniform(0.33, 0.45), rows * rng.uniform(0.35, 0.45)),
                               (cols * rng.uniform(0.26, 0.32), rows * rng.uniform(0.22, 0.28))), organ["liver"]),
                (organ_polygon(rng, (cols * rng.uniform(0.62, 0.72), rows * rng.uniform(0.68, 0.78)),
                               (cols * 0.13, rows * 0.1)), organ["kidney"]),
                (organ_polygon(rng, (cols * rng.uniform(0.3, 0.45), rows * rng.uniform(0.78, 0.85)),
                               (cols * 0.12, rows * 0.06)), organ["pancreas"]),
                (organ_polygon(rng, (cols * rng.uniform(0.5, 0.58), rows * rng.uniform(0.5, 0.6)),
                               (cols * 0.05, rows * 0.06), ripple=0.03), organ["vessels"])]
    if rng.uniform() < 0.5:
        polygons.append((organ_polygon(rng, (cols * 0.3, rows * 0.55), (cols * 0.06, rows * 0.05)),
                         organ["gallbladder"]))
    if rng.uniform() < 0.5:
        polygons.append((organ_polygon(rng, (cols * rng.uniform(0.6, 0.7), rows * 0.2), (cols * 0.08, rows * 0.025)),
                         organ["bones"]))
    return rasterise(polygons, SHAPE)


def colour_annotation(labels: np.ndarray, fan_mask: np.ndarray) -> np.ndarray:
    """RGB colour code of an organ index map; background (0, 0, 0) in the fan, (10, 10, 10) outside."""
    table = np.array([BACKGROUND_COLOURS[0]] + [ORGAN_COLOURS[name] for name in ORGANS], dtype=np.uint8)
    rgb = table[labels]
    rgb[(labels == 0) & ~fan_mask] = BACKGROUND_COLOURS[1]
    return rgb


def write_case(folder: dict[str, Path], stem: str, rng: np.random.Generator, annotated: bool, image_suffix: str,
               quirk: str | None) -> np.ndarray:
    """Write one image (and its annotation, if ``annotated``); return the organ index map."""
    fan = random_fan(rng, SHAPE)
    labels = np.where(fan.mask(SHAPE), organ_labels(rng), 0).astype(np.uint8)
    echo = echo_map(SHAPE, [(labels == ORGANS.index(name) + 1, level) for name, level in ECHO.items()])
    image = as_rgb(bmode(rng, echo, fan))
    Image.fromarray(image).save(folder[IMAGES] / f"{stem}{image_suffix}", quality=95)
    if annotated:
        annotation = Image.fromarray(colour_annotation(labels, fan.mask(SHAPE)))
        if quirk == "jpeg_annotation":
            annotation.save(folder[ANNOTATIONS] / f"{stem}.jpg", quality=95, subsampling=0)
        elif quirk == "rgba_annotation":
            annotation.convert("RGBA").save(folder[ANNOTATIONS] / f"{stem}.png")
        elif quirk == "grey_annotation":
            annotation.convert("L").save(folder[ANNOTATIONS] / f"{stem}.png")
        else:
            annotation.save(folder[ANNOTATIONS] / f"{stem}.png")
    return labels


def make_synthetic_ussim(root: Path, seed: int = 0, overwrite: bool = False, num_train: int = 10) -> dict:
    """Generate the synthetic US simulation release under ``root`` (see the module docstring).

    ``num_train`` AUS training images (at least 5, so that every quirk has its image; default 10).

    Returns a dict with ``root``, ``release`` (the ``abdominal_US/abdominal_US`` folder), ``cases``
    ({(subset, split): [stems]}), ``annotated`` ({(subset, split): bool}), ``quirks`` ({quirk: stem})
    and ``labels`` ({(subset, split, stem): organ index map, 0 background, 1 + index in ORGAN_COLOURS}).
    """
    if num_train < 5:
        raise ValueError(f"num_train must be at least 5 (the quirks use AUS training images 1-4), got {num_train}")
    root = Path(root)
    prepare_root(root, overwrite, (RELEASE[0],))
    layout = {**LAYOUT, "AUS": {**LAYOUT["AUS"], "train": (num_train, True)}}
    release = root.joinpath(*RELEASE)
    quirk_of = {where: quirk for quirk, where in QUIRKS.items()}
    cases, annotated, labels = {}, {}, {}
    for subset_index, (subset, splits) in enumerate(layout.items()):
        for split_index, (split, (count, has_annotations)) in enumerate(splits.items()):
            folder = {kind: release / subset / kind / split for kind in (IMAGES, ANNOTATIONS)}
            folder[IMAGES].mkdir(parents=True)
            if has_annotations:
                folder[ANNOTATIONS].mkdir(parents=True)
            cases[subset, split] = [stem_of(subset, index) for index in range(count)]
            annotated[subset, split] = has_annotations
            for index, stem in enumerate(cases[subset, split]):
                rng = np.random.default_rng([seed, subset_index, split_index, index])
                quirk = quirk_of.get((subset, split, index))
                suffix = ".jpg" if subset == "RUS" or quirk == "jpg_image" else ".png"
                labels[subset, split, stem] = write_case(folder, stem, rng, has_annotations, suffix, quirk)
    return {"root": root, "release": release, "cases": cases, "annotated": annotated, "labels": labels,
            "quirks": {quirk: stem_of(subset, index) for quirk, (subset, _, index) in QUIRKS.items()}}
