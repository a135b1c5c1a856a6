"""Convert the US simulation and segmentation dataset (Kaggle ignaciorlando/ussimandsegm) to nnU-Net v2.

Layout of the Kaggle release::

    abdominal_US/abdominal_US/AUS/images/{train,test}/<stem>.<png|jpg>        simulated (from CT) scans
    abdominal_US/abdominal_US/AUS/annotations/{train,test}/<stem>.<png|jpg>   RGB colour codes
    abdominal_US/abdominal_US/RUS/images/{train,test}/<stem>.<png|jpg>        real scans
    abdominal_US/abdominal_US/RUS/annotations/test/<stem>.<png|jpg>           (no annotations/train)

Annotation colours: liver (100, 0, 100), kidney (255, 255, 0), pancreas (0, 0, 255), vessels
(255, 0, 0), adrenals (0, 255, 255), gallbladder (0, 255, 0), bones (255, 255, 255), spleen
(255, 0, 255); background (0, 0, 0) and (10, 10, 10).

Output, in ``<output>/Dataset{id:03d}_{name}/`` (``--subset AUS``, the default)::

    imagesTr/aus_train_ct14-1_0000.png   labelsTr/aus_train_ct14-1.png      (AUS train)
    imagesTs/aus_test_ct3-5_0000.png     labelsTs/aus_test_ct3-5.png        (AUS test, labels kept for evaluation)

``--subset RUS``: the annotated RUS test images become the training cases (``rus_test_<stem>``; RUS
has no other labels) and the unlabelled RUS training images go to ``imagesTs`` (``rus_train_<stem>``).
``--task liver`` (default, SPA-DCN-Net's task): 0 background, 1 liver, every other organ background;
``--task organs``: 0 background, 1 liver, 2 kidney, 3 pancreas, 4 vessels, 5 adrenals,
6 gallbladder, 7 bones, 8 spleen. Case ids are ``<subset>_<split>_<stem>`` with characters other
than letters, digits and ``-`` replaced by ``_``.

Quirks handled:

* images and annotations are paired by stem within a split; the extensions may differ
  (``ct1-10.jpg`` with ``ct1-10.png``);
* colours are matched to the nearest palette colour (Euclidean distance in RGB) and accepted within
  ``--tolerance`` (default 60, just under half the smallest distance between colours of different
  classes, 127.6 between liver and the background (10, 10, 10), so no colour is within tolerance
  of two classes): JPEG annotations keep their labels. A colour farther than that from every palette
  colour is an error naming the file, the colour, its pixel count and position. Heavily compressed
  annotations (JPEG with chroma subsampling smears colour edges by 100 and more) need a larger
  ``--tolerance``; the nearest colour still wins;
* files are read with PIL, which returns RGB order (OpenCV's BGR would turn kidney yellow into
  adrenal cyan and pancreas blue into vessel red); RGBA annotations lose their alpha channel, and
  palette (``P``) PNGs are expanded to RGB;
* grey annotations (``L``): interpreted as the colour annotation saved as grey, i.e. ITU-R 601 luma
  ``0.299 R + 0.587 G + 0.114 B`` (PIL's ``convert("L")`` and OpenCV's grey reader), matched to the
  luma of the palette colours within ``GREY_TOLERANCE`` (5; the closest two classes, pancreas 29.1
  and liver 41.3, are 12.2 apart);
* images are RGB with grey content or grey: written as one grey channel (``--rgb`` keeps three).

Refused, each problem naming the file (all problems of a run reported together, nothing written):
no ``AUS``/``RUS`` folder with ``images/`` (or two), a missing images folder of a split, a
missing annotations folder of an annotated split (both AUS splits, RUS test), two images (or
annotations) with one stem, an image without an annotation and an annotation without an image, an
annotation of another size than its image, a colour beyond the tolerance, an unreadable file.

Command line::

    nnunet_ext_convert_ussim USSIM_ROOT -d 532 [-n USSim] [--subset AUS|RUS] [--task liver|organs]
        [--tolerance 60] [--rgb] [-o OUTPUT] [--overwrite] [--dry-run] [-np N]
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nnunet_ext.dataset_conversion import common

RELEASE = ("abdominal_US", "abdominal_US")
SUBSETS = ("AUS", "RUS")
SPLITS = ("train", "test")
IMAGES, ANNOTATIONS = "images", "annotations"
FILE_ENDINGS = (".png", ".jpg", ".jpeg")
ORGAN_COLOURS = {
    "liver": (100, 0, 100),
    "kidney": (255, 255, 0),
    "pancreas": (0, 0, 255),
    "vessels": (255, 0, 0),
    "adrenals": (0, 255, 255),
    "gallbladder": (0, 255, 0),
    "bones": (255, 255, 255),
    "spleen": (255, 0, 255),
}
BACKGROUND_COLOURS = ((0, 0, 0), (10, 10, 10))
TASKS = ("liver", "organs")
DEFAULT_TOLERANCE = 60.0
GREY_TOLERANCE = 5.0
LUMA = np.array([0.299, 0.587, 0.114])
GREY_MODES, COLOUR_MODES = ("1", "L", "LA"), ("RGB", "RGBA", "RGBX", "P", "PA")
REFERENCE = ("Vitale S, Orlando JI, Iarussi E, Larrabide I. Improving realism in patient-specific abdominal "
             "ultrasound simulation using CycleGANs. IJCARS 15 (2020) 183-192; "
             "https://www.kaggle.com/datasets/ignaciorlando/ussimandsegm")


def task_labels(task: str) -> dict[str, int]:
    """nnU-Net ``labels`` of a task: ``liver`` (background, liver) or ``organs`` (background + the 8 organs)."""
    organs = ("liver",) if task == "liver" else tuple(ORGAN_COLOURS)
    return {"background": 0, **{organ: k + 1 for k, organ in enumerate(organs)}}


def palette(task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Palette colours (K, 3), the label of each in ``task`` and their names (background colours first)."""
    labels = task_labels(task)
    names = ["background"] * len(BACKGROUND_COLOURS) + list(ORGAN_COLOURS)
    colours = np.array(BACKGROUND_COLOURS + tuple(ORGAN_COLOURS.values()), dtype=np.float64)
    return colours, np.array([labels.get(name, 0) for name in names], dtype=np.uint8), names


def read_annotation(path: Path) -> tuple[np.ndarray, bool]:
    """The annotation as RGB ``(rows, cols, 3)`` or grey ``(rows, cols)`` array, and whether it is grey."""
    try:
        with Image.open(path) as image:
            mode = image.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise common.ConversionError(f"cannot read {path}: {error}") from None
    if mode in GREY_MODES:
        return common.read_png(path, "L"), True
    if mode in COLOUR_MODES:
        return common.read_png(path, "RGB"), False
    raise common.ConversionError(f"{path} has the image mode {mode}; expected an RGB(A), palette or grey annotation")


def colour_labels(annotation: np.ndarray, grey: bool, task: str, tolerance: float, path: Path) -> np.ndarray:
    """Label map of an annotation: each distinct colour (or grey value) goes to its nearest palette entry.

    A colour farther than ``tolerance`` (``GREY_TOLERANCE`` for grey annotations, compared with the palette's
    luma) from every palette colour is an error naming the file and the colours.
    """
    colours, labels, names = palette(task)
    if grey:
        values, inverse = np.unique(annotation, return_inverse=True)
        distance = np.abs(values[:, None].astype(np.float64) - (colours @ LUMA)[None, :])
        limit = GREY_TOLERANCE
    else:
        packed = (annotation[..., 0].astype(np.uint32) << 16) | (annotation[..., 1].astype(np.uint32) << 8) \
            | annotation[..., 2]
        values, inverse = np.unique(packed, return_inverse=True)
        rgb = np.stack([values >> 16, (values >> 8) & 255, values & 255], axis=1).astype(np.float64)
        distance = np.linalg.norm(rgb[:, None, :] - colours[None, :, :], axis=2)
        limit = tolerance
    nearest = distance.argmin(axis=1)
    off = np.flatnonzero(distance[np.arange(len(values)), nearest] > limit)
    if off.size:
        inverse = inverse.reshape(annotation.shape[:2])
        described = []
        for k in off[np.argsort(-np.bincount(inverse.ravel(), minlength=len(values))[off])][:3]:
            rows, cols = np.nonzero(inverse == k)
            value = int(values[k]) if grey else (int(values[k]) >> 16, int(values[k]) >> 8 & 255, int(values[k]) & 255)
            described.append(f"{'grey value' if grey else 'colour'} {value} ({rows.size} pixels, e.g. row {rows[0]} "
                             f"column {cols[0]}) is {distance[k, nearest[k]]:.1f} from the nearest palette "
                             f"{'luma' if grey else 'colour'}, {names[nearest[k]]}")
        raise common.ConversionError(f"{path} has {off.size} colour(s) beyond the tolerance {limit:g}: "
                                     + "; ".join(described)
                                     + ("" if grey else "; raise --tolerance if these are compression artefacts"))
    return labels[nearest][inverse].reshape(annotation.shape[:2])


@dataclass(frozen=True)
class USSimCase:
    """One image with its colour annotation (None for an unlabelled RUS training image)."""

    case_id: str
    image: Path
    annotation: Path | None
    task: str
    tolerance: float
    rgb: bool = False
    test: bool = False


def find_subset(root: Path, subset: str) -> Path:
    """The one folder called ``subset`` (AUS or RUS) with an ``images`` folder under ``root`` (root included)."""
    found = [root] if root.name == subset and (root / IMAGES).is_dir() else []
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not common.is_hidden(d))
        found += [Path(folder) / d for d in subfolders if d == subset and (Path(folder) / d / IMAGES).is_dir()]
    if not found:
        raise common.ConversionError(f"no {subset}/{IMAGES} folder under {root}: pass the folder of the Kaggle "
                                     f"release ({'/'.join(RELEASE)} or above)")
    if len(found) > 1:
        raise common.ConversionError(f"{len(found)} {subset} folders under {root} ({found[0]}, {found[1]}): pass "
                                     f"the folder of one release")
    return found[0]


def files_by_stem(folder: Path, problems: common.Problems, what: str) -> dict[str, Path]:
    """Stem -> file for the images (or annotations) of one split; two files with one stem are a problem."""
    return common.index_by(common.find_files(folder, FILE_ENDINGS), lambda p: p.stem, problems, f"{what} stem")


def case_id(subset: str, split: str, stem: str) -> str:
    """``aus_train_ct14-1``: subset, split and the stem with characters other than ``[A-Za-z0-9-]`` as ``_``."""
    return f"{subset.lower()}_{split}_{re.sub(r'[^A-Za-z0-9-]+', '_', stem)}"


def discover(folder: Path, subset: str, task: str, tolerance: float, rgb: bool,
             problems: common.Problems) -> list[USSimCase]:
    """The cases of one subset folder: AUS train -> training, AUS test -> test with labels; RUS test (the
    annotated split) -> training, RUS train (no annotations) -> unlabelled test images."""
    cases = []
    for split in SPLITS:
        images_folder, annotations_folder = folder / IMAGES / split, folder / ANNOTATIONS / split
        if not images_folder.is_dir():
            problems.add(images_folder, f"{images_folder} is missing: a {subset} release has {IMAGES}/train and "
                                        f"{IMAGES}/test")
            continue
        images = files_by_stem(images_folder, problems, "image")
        unlabelled = subset == "RUS" and split == "train"
        if unlabelled:
            cases += [USSimCase(case_id(subset, split, s), images[s], None, task, tolerance, rgb, test=True)
                      for s in sorted(images, key=common.natural_key)]
            continue
        if not annotations_folder.is_dir():
            problems.add(annotations_folder, f"{annotations_folder} is missing: the {subset} {split} images "
                                             f"are annotated in the release")
            continue
        annotations = files_by_stem(annotations_folder, problems, "annotation")
        pairs = common.pair_files(images, annotations, problems, image_word=f"image {{key}}.* in {images_folder}",
                                  label_word=f"annotation {{key}}.* in {annotations_folder}")
        test = subset == "AUS" and split == "test"
        cases += [USSimCase(case_id(subset, split, stem), image, annotation, task, tolerance, rgb, test)
                  for stem, image, annotation in pairs]
    return cases


def convert_case(case: USSimCase, folder: Path | None) -> str:
    """Read and check one image and its annotation; write them unless ``folder`` is None (dry run)."""
    image = common.read_png(case.image)
    label = None
    if case.annotation is not None:
        annotation, grey = read_annotation(case.annotation)
        if annotation.shape[:2] != image.shape[:2]:
            raise common.ConversionError(
                f"size mismatch: {case.annotation} is {annotation.shape[1]}x{annotation.shape[0]} (width x height) "
                f"but its image {case.image} is {image.shape[1]}x{image.shape[0]}")
        label = colour_labels(annotation, grey, case.task, case.tolerance, case.annotation)
    if folder is not None:
        common.write_png_image(image, folder, case.case_id, test=case.test, rgb=case.rgb, source=case.image)
        if label is not None:
            common.write_png_mask(label, common.label_file(folder, case.case_id, common.PNG_ENDING, case.test),
                                  len(task_labels(case.task)))
    annotation_note = f" + {case.annotation.name}" if case.annotation is not None else " (unlabelled)"
    return f"{case.image.parent.name}/{case.image.name}{annotation_note} -> {case.case_id}"


def convert_ussim(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "USSim",
                  subset: str = "AUS", task: str = "liver", tolerance: float = DEFAULT_TOLERANCE, rgb: bool = False,
                  overwrite: bool = False, dry_run: bool = False, num_processes: int = 1) -> Path:
    """Convert one subset of the US simulation release at ``input_root``; return the dataset folder."""
    if subset not in SUBSETS:
        raise common.ConversionError(f"subset must be AUS or RUS, got {subset!r}")
    if task not in TASKS:
        raise common.ConversionError(f"task must be one of {list(TASKS)}, got {task!r}")
    if not tolerance >= 0:
        raise common.ConversionError(f"--tolerance must be a non-negative RGB distance, got {tolerance}")
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    root = common.check_input_root(input_root, "the folder of the Kaggle release (abdominal_US)")
    problems = common.Problems()
    cases = discover(find_subset(root, subset), subset, task, tolerance, rgb, problems)
    problems.raise_if_any()
    return common.write_dataset(target, cases, convert_case, common.DatasetJson(
        channel_names=common.png_channel_names(rgb), labels=task_labels(task), file_ending=common.PNG_ENDING,
        dataset_name=dataset_name, reference=REFERENCE,
        description=f"US simulation and segmentation, {subset} subset, {task} task (colour annotations matched "
                    f"to the palette within RGB distance {tolerance:g})"),
        overwrite=overwrite, dry_run=dry_run, num_processes=num_processes)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_ussim``."""
    parser = common.converter_parser("nnunet_ext_convert_ussim", "Convert the US simulation and segmentation "
                                     "dataset (abdominal_US) to nnU-Net.", default_name="USSim",
                                     input_help="the folder of the Kaggle release (abdominal_US or a folder above)")
    parser.add_argument("--subset", choices=SUBSETS, default="AUS",
                        help="AUS: simulated images (default); RUS: real images (its annotated test split trains)")
    parser.add_argument("--task", choices=TASKS, default="liver",
                        help="liver: liver vs background (default); organs: the 8 annotated organs")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest RGB distance from a palette colour (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--rgb", action="store_true", help="keep R, G, B as three input channels (default: grey)")
    common.run_converter_cli(parser, argv, lambda a: convert_ussim(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.subset, a.task, a.tolerance, a.rgb,
        a.overwrite, a.dry_run, a.num_processes))


if __name__ == "__main__":
    main()
