"""Tiny synthetic releases of BUSI, BUSIS and TN3K (SCRNet's datasets), in their real layouts and quirks.

They are the fixtures of the converter tests and of the end-to-end runs of 2D trainers
(``tests/datasets.py``): 44-76 px images, written in well under a second. Images come from the B-mode model of
:mod:`nnunet_ext.synthetic.ultrasound_abdominal` with a linear probe (a fan whose apex lies
infinitely far above the image, i.e. parallel scan lines): skin, fat, gland and chest-wall layers
with speckle, and a hypoechoic lesion with posterior acoustic enhancement (benign) or shadowing
(malignant) that a network can learn. Everything is deterministic given the seed: each image
draws from its own ``numpy.random.default_rng([seed, stream, number])``.

BUSI (``make_synthetic_busi``), as the Kaggle/Cairo release ``Dataset_BUSI_with_GT``::

    Dataset_BUSI_with_GT/benign/benign (1).png, benign (1)_mask.png, ..., benign (4)_mask_1.png
    Dataset_BUSI_with_GT/malignant/malignant (1).png, ...   Dataset_BUSI_with_GT/normal/normal (1).png, ...

* names with spaces and parentheses, numbers from 1 without padding (``benign (10)`` sorts
  before ``benign (2)``);
* images are RGB PNGs with grey content (three equal channels), sizes vary per image;
* masks are 8-bit 0/255, except a few stored as RGBA (opaque, grey) or as 3-channel RGB;
* images with two or three lesions have one mask per lesion: ``_mask``, ``_mask_1`` (``_mask_2``),
  to be merged with OR;
* ``normal`` images have an all-zero mask.

BUSIS (``make_synthetic_busis``): the release is only given on request and its layout is not
verified, so the twin is the layout the converter expects by default: one folder of images and
one of masks with matching stems, ``BUSIS/original/<n>.bmp`` and ``BUSIS/GT/<mask stem>.png``
(``mask_stem`` is a ``str.format`` rule on the image stem, ``"{stem}"`` by default, e.g.
``"{stem}_GT"``). Images are 8-bit greyscale BMP (one an RGB BMP with grey content); masks are
PNG (one a BMP) with anti-aliased edges, i.e. grey values between 0 and 255, binarised at > 127.

TN3K (``make_synthetic_tn3k``), as the TRFE-Net release::

    tn3k/trainval-image/0000.jpg ..  tn3k/trainval-mask/0000.jpg ..
    tn3k/test-image/0000.jpg ..      tn3k/test-mask/0000.jpg ..
    tn3k/tn3k-trainval-fold0.json .. tn3k-trainval-fold4.json   {"train": [indices], "val": [indices]}

* images are RGB JPEGs with grey content, masks greyscale JPEGs (compression artefacts: grey
  values around the edges, to be thresholded);
* the folds are a 5-fold partition of the trainval images, given as integer indices into the
  numerically sorted trainval list, not as file names.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from nnunet_ext.dataset_conversion import busi, busis, tn3k
from nnunet_ext.synthetic.ultrasound_abdominal import (Fan, as_rgb, bmode, echo_map, organ_polygon, prepare_root,
                                                       rasterise)

BUSIS_ROOT = "BUSIS"
BUSI_EXTRA_MASKS = {("benign", 4): 1, ("benign", 7): 2, ("malignant", 2): 1}
BUSI_RGBA_MASKS = (("benign", 3), ("malignant", 4))
BUSI_RGB_MASKS = (("benign", 6), ("normal", 2))
POSTERIOR_GAIN = {"benign": 1.35, "malignant": 0.55}
LAYERS = ((0.08, 0.9), (0.25, 0.35), (0.75, 0.65), (1.0, 0.45))  # (lower depth, echogenicity): skin .. chest wall
LESION_ECHO = 0.12
_BUSI_STREAM, _BUSIS_STREAM, _TN3K_STREAM = 10, 11, 12


def linear_probe(shape: tuple[int, int]) -> Fan:
    """A linear array as a fan with an apex 1e6 px above the image: parallel scan lines, depth = row / rows."""
    rows, cols = shape
    far = 1e6
    return Fan(apex_x=cols / 2, apex_y=-far, r_min=far, r_max=far + rows, half_angle=1.0)


def lesions(rng: np.random.Generator, shape: tuple[int, int], count: int, irregular: bool) -> list[np.ndarray]:
    """``count`` non-overlapping lesion masks side by side at mid depth (smooth ovals, or lobulated if irregular)."""
    rows, cols = shape
    masks = []
    for index in range(count):
        centre = ((index + 0.5) / count * cols + rng.uniform(-0.05, 0.05) * cols, rng.uniform(0.4, 0.6) * rows)
        radius = min(rows, cols / count) * rng.uniform(0.14, 0.22)
        polygon = organ_polygon(rng, centre, (radius * rng.uniform(1.1, 1.5), radius),
                                ripple=0.35 if irregular else 0.1, rotation=rng.uniform(-0.3, 0.3))
        masks.append(rasterise([(polygon, 1)], shape).astype(bool))
    return masks


def scan(rng: np.random.Generator, shape: tuple[int, int], lesion_masks: list[np.ndarray],
         posterior_gain: float) -> np.ndarray:
    """uint8 B-mode image: tissue layers, hypoechoic lesions, shadow (< 1) or enhancement (> 1) below them."""
    depth = np.broadcast_to(np.linspace(0.0, 1.0, shape[0])[:, None], shape)
    layers = [(depth >= top, level) for top, level in zip((0.0,) + tuple(t for t, _ in LAYERS[:-1]),
                                                          (level for _, level in LAYERS))]
    union = np.logical_or.reduce(lesion_masks) if lesion_masks else np.zeros(shape, bool)
    echo = echo_map(shape, layers + [(union, LESION_ECHO)])
    echo[np.maximum.accumulate(union, axis=0) & ~union] *= posterior_gain
    return bmode(rng, echo, linear_probe(shape))


def random_shape(rng: np.random.Generator, low: int = 44, high: int = 76) -> tuple[int, int]:
    """A varied image size (rows, columns), each side in ``[low, high]``."""
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def prepare_folder(root: Path, generated: str, overwrite: bool) -> Path:
    """``root / generated``, created empty by the shared :func:`ultrasound_abdominal.prepare_root` rules."""
    root = Path(root)
    prepare_root(root, overwrite, (generated,))
    (root / generated).mkdir()
    return root / generated


def write_busi_mask(mask: np.ndarray, path: Path, mode: str) -> None:
    """A boolean mask as a 0/255 PNG in PIL ``mode`` L, RGB (grey) or RGBA (grey, opaque)."""
    grey = mask.astype(np.uint8) * 255
    if mode == "L":
        Image.fromarray(grey).save(path)
    elif mode == "RGB":
        Image.fromarray(as_rgb(grey)).save(path)
    else:
        Image.fromarray(np.dstack([as_rgb(grey), np.full_like(grey, 255)]), mode="RGBA").save(path)


def make_synthetic_busi(root: Path, seed: int = 0, overwrite: bool = False,
                        counts: dict[str, int] | None = None) -> dict:
    """Write a synthetic ``Dataset_BUSI_with_GT`` under ``root`` (see the module docstring).

    ``counts``: images per category (default benign 10, malignant 5, normal 3). Returns a dict
    with ``root``, ``dataset_folder``, ``numbers`` (category -> numbers), ``extra_masks`` (case id
    -> number of additional masks), ``rgba_masks`` and ``rgb_masks`` (mask file names), and per
    case id ``shapes`` (rows, columns) and ``lesion_pixels`` (of the OR of its masks).
    """
    counts = {"benign": 10, "malignant": 5, "normal": 3} if counts is None else counts
    folder = prepare_folder(root, busi.ROOT_FOLDER, overwrite)
    facts = {"root": Path(root), "dataset_folder": folder, "numbers": {}, "extra_masks": {}, "rgba_masks": [],
             "rgb_masks": [], "shapes": {}, "lesion_pixels": {}}
    for stream, category in enumerate(busi.CATEGORIES):
        (folder / category).mkdir()
        facts["numbers"][category] = list(range(1, counts.get(category, 0) + 1))
        for number in facts["numbers"][category]:
            rng = np.random.default_rng([seed, _BUSI_STREAM, stream, number])
            shape = random_shape(rng)
            extra = BUSI_EXTRA_MASKS.get((category, number), 0)
            masks = [] if category == "normal" else lesions(rng, shape, 1 + extra, category == "malignant")
            image = scan(rng, shape, masks, POSTERIOR_GAIN.get(category, 1.0))
            Image.fromarray(as_rgb(image)).save(folder / category / busi.image_name(category, number))
            mode = ("RGBA" if (category, number) in BUSI_RGBA_MASKS
                    else "RGB" if (category, number) in BUSI_RGB_MASKS else "L")
            for index, mask in enumerate(masks or [np.zeros(shape, bool)]):
                name = busi.mask_name(category, number, index)
                write_busi_mask(mask, folder / category / name, mode)
                if mode != "L":
                    facts[f"{mode.lower()}_masks"].append(name)
            case = busi.case_id(category, number)
            if extra:
                facts["extra_masks"][case] = extra
            facts["shapes"][case] = shape
            facts["lesion_pixels"][case] = int(sum(mask.sum() for mask in masks))
    return facts


def make_synthetic_busis(root: Path, seed: int = 0, overwrite: bool = False, num_cases: int = 10,
                         mask_stem: str = busis.DEFAULT_MASK_STEM) -> dict:
    """Write a synthetic BUSIS release ``BUSIS/{original,GT}`` under ``root`` (see the module docstring).

    Image ``n`` (1 .. ``num_cases``) is ``original/<n>.bmp``, its mask ``GT/<mask_stem>.png`` with
    ``stem = str(n)``; image 2 is an RGB BMP, mask 3 a BMP. Returns ``root``, ``dataset_folder``,
    ``stems``, ``mask_files`` (stem -> mask file name), ``shapes`` and ``lesion_pixels`` (after
    binarising at > 127) per stem.
    """
    folder = prepare_folder(root, BUSIS_ROOT, overwrite)
    (folder / busis.IMAGE_FOLDER).mkdir()
    (folder / busis.MASK_FOLDER).mkdir()
    facts = {"root": Path(root), "dataset_folder": folder, "stems": [], "mask_files": {}, "shapes": {},
             "lesion_pixels": {}}
    for number in range(1, num_cases + 1):
        rng = np.random.default_rng([seed, _BUSIS_STREAM, number])
        shape = random_shape(rng)
        malignant = number % 3 == 0
        (mask,) = lesions(rng, shape, 1, malignant)
        image = scan(rng, shape, [mask], POSTERIOR_GAIN["malignant" if malignant else "benign"])
        stem = str(number)
        Image.fromarray(as_rgb(image) if number == 2 else image).save(folder / busis.IMAGE_FOLDER / f"{stem}.bmp")
        soft = np.round(255 * np.clip(gaussian_filter(mask.astype(float), 0.7), 0, 1)).astype(np.uint8)
        mask_file = f"{mask_stem.format(stem=stem)}.{'bmp' if number == 3 else 'png'}"
        Image.fromarray(soft).save(folder / busis.MASK_FOLDER / mask_file)
        facts["stems"].append(stem)
        facts["mask_files"][stem] = mask_file
        facts["shapes"][stem] = shape
        facts["lesion_pixels"][stem] = int((soft > 127).sum())
    return facts


def write_jpeg(array: np.ndarray, path: Path, quality: int) -> None:
    """Write a uint8 grey (rows, cols) or RGB (rows, cols, 3) array as a JPEG."""
    Image.fromarray(array).save(path, quality=quality)


def make_synthetic_tn3k(root: Path, seed: int = 0, overwrite: bool = False, num_trainval: int = 15,
                        num_test: int = 4) -> dict:
    """Write a synthetic ``tn3k`` release under ``root`` (see the module docstring).

    Returns ``root``, ``dataset_folder``, ``trainval`` and ``test`` (image numbers), ``folds``
    (the five ``{"train": [...], "val": [...]}`` index lists as written) and ``shapes``
    (``("trainval"|"test", number)`` -> (rows, columns)).
    """
    if num_trainval < tn3k.NUM_FOLDS:
        raise ValueError(f"need at least {tn3k.NUM_FOLDS} trainval images for {tn3k.NUM_FOLDS} folds, "
                         f"got {num_trainval}")
    folder = prepare_folder(root, tn3k.ROOT_FOLDER, overwrite)
    facts = {"root": Path(root), "dataset_folder": folder, "trainval": list(range(num_trainval)),
             "test": list(range(num_test)), "folds": [], "shapes": {}}
    for stream, (subset, images, masks, count) in enumerate(
            [("trainval", tn3k.TRAINVAL_IMAGES, tn3k.TRAINVAL_MASKS, num_trainval),
             ("test", tn3k.TEST_IMAGES, tn3k.TEST_MASKS, num_test)]):
        (folder / images).mkdir()
        (folder / masks).mkdir()
        for number in range(count):
            rng = np.random.default_rng([seed, _TN3K_STREAM, stream, number])
            shape = random_shape(rng)
            (mask,) = lesions(rng, shape, 1, irregular=bool(rng.integers(2)))
            image = scan(rng, shape, [mask], rng.uniform(0.6, 1.3))
            write_jpeg(as_rgb(image), folder / images / tn3k.file_name(number), quality=90)
            write_jpeg(mask.astype(np.uint8) * 255, folder / masks / tn3k.file_name(number), quality=75)
            facts["shapes"][(subset, number)] = shape
    order = np.random.default_rng([seed, _TN3K_STREAM, 2]).permutation(num_trainval)
    for fold, val in enumerate(np.array_split(order, tn3k.NUM_FOLDS)):
        split = {"train": sorted(set(range(num_trainval)) - set(val.tolist())), "val": sorted(val.tolist())}
        (folder / tn3k.fold_file_name(fold)).write_text(json.dumps(split))
        facts["folds"].append(split)
    return facts
