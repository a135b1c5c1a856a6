"""Convert TN3K (thyroid nodule ultrasound, Gong et al. 2021/2023) to an nnU-Net v2 raw dataset.

Real layout (the TRFE-Net release)::

    tn3k/trainval-image/0000.jpg .. 2878.jpg    tn3k/trainval-mask/0000.jpg .. 2878.jpg
    tn3k/test-image/0000.jpg .. 0613.jpg        tn3k/test-mask/0000.jpg .. 0613.jpg
    tn3k/tn3k-trainval-fold0.json .. tn3k-trainval-fold4.json      {"train": [0, 2, ...], "val": [1, ...]}

Output, in ``<output>/Dataset{id:03d}_{name}/``::

    imagesTr/tn3k_0042_0000.png   labelsTr/tn3k_0042.png          (trainval image 0042.jpg)
    imagesTs/tn3k_test_0042_0000.png   labelsTs/tn3k_test_0042.png (test set, labels kept for evaluation)
    splits_final.json   dataset.json   (0 background, 1 nodule)

Quirks handled:

* masks are JPEGs: compression leaves grey values around the edges, so masks are thresholded at
  >= 128 (an RGB JPEG mask is made grey by its luma first);
* images are JPEGs (RGB with grey content): written as lossless greyscale PNGs, since nnU-Net does
  not read JPEG (``--rgb`` keeps three channels);
* the five fold files hold integer *indices into the numerically sorted trainval list*, not file
  names: index ``i`` is the ``i``-th trainval image by number (with the release's contiguous
  numbering 0000-2878, index ``i`` is ``i.jpg``). They become nnU-Net's ``splits_final.json``
  (fold k = ``tn3k-trainval-fold{k}.json``), which ``nnUNetv2_plan_and_preprocess`` copies to
  nnUNet_preprocessed and ``nnUNetv2_train DATASET 2d k`` then trains with;
* images and masks are paired by their number, never by sorted position.

Refused, each problem naming the file (all problems reported together, nothing written): a missing
folder or fold file, a file name that is not a number, an image without a mask and a mask without
an image, a mask of another size than its image, an unreadable file or fold file, a fold file
without exactly the keys ``train`` and ``val``, an index that is not an integer or not in the
trainval list (unknown fold index), an index repeated or in both train and val of a fold.

Command line::

    nnunet_ext_convert_tn3k tn3k -d 523 [-n TN3K] [--rgb] [-o OUTPUT] [--overwrite] [--dry-run] [-np N]
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.dataset_conversion import common

ROOT_FOLDER = "tn3k"
TRAINVAL_IMAGES, TRAINVAL_MASKS = "trainval-image", "trainval-mask"
TEST_IMAGES, TEST_MASKS = "test-image", "test-mask"
NUM_FOLDS = 5
LABELS = {"background": 0, "nodule": 1}
MASK_THRESHOLD = 128
NUMBER = re.compile(r"\d+")
REFERENCE = ("Gong H, Chen J, Chen G, Li H, Li G, Chen F. Thyroid region prior guided attention for ultrasound "
             "segmentation of thyroid nodules. Computers in Biology and Medicine 155 (2023) 106389; "
             "https://github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation")


def file_name(number: int) -> str:
    """``0042.jpg``: TN3K's name of image (and mask) ``number``."""
    return f"{number:04d}.jpg"


def fold_file_name(fold: int) -> str:
    """``tn3k-trainval-fold0.json``: the file of cross-validation fold ``fold``."""
    return f"tn3k-trainval-fold{fold}.json"


def case_id(number: int, test: bool = False) -> str:
    """``tn3k_0042`` (trainval) or ``tn3k_test_0042`` (test set)."""
    return f"tn3k_{'test_' if test else ''}{number:04d}"


@dataclass(frozen=True)
class TN3KCase:
    """One TN3K image with its mask (a test case keeps its mask as ``labelsTs``)."""

    case_id: str
    image: Path
    mask: Path
    test: bool = False
    rgb: bool = False


def numbered_files(folder: Path, problems: common.Problems) -> dict[int, Path]:
    """Number -> JPEG of a TN3K folder (``0042.jpg`` -> 42); other names and duplicate numbers are problems."""
    files = common.find_files(folder, (".jpg", ".jpeg"))
    for path in files:
        if not NUMBER.fullmatch(path.stem):
            problems.add(path, f"{path} is not named like a TN3K file ({file_name(42)})")
    return common.index_by(files, lambda p: int(p.stem) if NUMBER.fullmatch(p.stem) else None, problems, "number")


def discover_subset(root: Path, images: str, masks: str, test: bool, rgb: bool,
                    problems: common.Problems) -> list[TN3KCase]:
    """Pair the images and masks of one subset (trainval or test) by number, in numeric order."""
    folders = [root / images, root / masks]
    missing = [folder for folder in folders if not folder.is_dir()]
    for folder in missing:
        problems.add(folder, f"{folder} is missing: a TN3K release has {TRAINVAL_IMAGES}, {TRAINVAL_MASKS}, "
                             f"{TEST_IMAGES} and {TEST_MASKS}")
    if missing:
        return []
    pairs = common.pair_files(numbered_files(folders[0], problems), numbered_files(folders[1], problems), problems,
                              image_word=f"image {images}/{{key:04d}}.jpg",
                              label_word=f"mask {masks}/{{key:04d}}.jpg")
    return [TN3KCase(case_id(number, test), image, mask, test, rgb) for number, image, mask in pairs]


def read_fold(path: Path, trainval_ids: list[str]) -> dict[str, list[str]]:
    """One fold file as nnU-Net case ids: every index must be an integer into the sorted trainval list."""
    try:
        fold = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise common.ConversionError(f"cannot read fold file {path}: {error}") from None
    if not isinstance(fold, dict) or set(fold) != {"train", "val"} or not all(
            isinstance(indices, list) for indices in fold.values()):
        got = (f"a JSON {type(fold).__name__}" if not isinstance(fold, dict) else
               f"the keys {sorted(fold)}" if set(fold) != {"train", "val"} else "train/val values that are not lists")
        raise common.ConversionError(f"{path} must hold {{\"train\": [indices], \"val\": [indices]}}, got {got}")
    problems = []
    for key in ("train", "val"):
        bad = [i for i in fold[key] if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(trainval_ids)]
        if bad:
            problems.append(f"unknown {key} indices {bad[:10]}")
        repeated = sorted((i for i, n in Counter(map(str, fold[key])).items() if n > 1), key=common.natural_key)
        if repeated:
            problems.append(f"{key} indices listed twice {repeated[:10]}")
    if problems:
        raise common.ConversionError(f"{path}: {'; '.join(problems)} (indices into the {len(trainval_ids)} "
                                     f"numerically sorted trainval images, 0..{len(trainval_ids) - 1})")
    return {key: [trainval_ids[i] for i in fold[key]] for key in ("train", "val")}


def read_splits(root: Path, trainval: list[TN3KCase], problems: common.Problems) -> list[dict[str, list[str]]]:
    """The five folds as ``splits_final.json`` content (fold k from ``tn3k-trainval-fold{k}.json``)."""
    ids = [case.case_id for case in trainval]  # already in numeric order
    splits = []
    for fold in range(NUM_FOLDS):
        path = root / fold_file_name(fold)
        if not path.is_file():
            problems.add(path, f"fold file {path} is missing")
            continue
        split = problems.check(path, read_fold, path, ids)
        if split is not None:
            overlap = sorted(set(split["train"]) & set(split["val"]))
            if overlap:
                problems.add(path, f"{path} has cases in both train and val: {overlap[:10]}")
            splits.append(split)
    return splits


def convert_case(case: TN3KCase, folder: Path | None) -> str:
    """Read one image and its JPEG mask, threshold the mask at >= 128 and (unless ``folder`` is None) write both."""
    image = common.read_png(case.image)
    mask = common.to_grey(common.read_png(case.mask), case.mask)
    if mask.shape != image.shape[:2]:
        raise common.ConversionError(f"size mismatch: {case.mask} is {mask.shape[1]}x{mask.shape[0]} (width x "
                                     f"height) but its image {case.image} is {image.shape[1]}x{image.shape[0]}")
    if folder is not None:
        common.write_png_image(image, folder, case.case_id, test=case.test, rgb=case.rgb, source=case.image)
        common.write_png_mask((mask >= MASK_THRESHOLD).astype(np.uint8),
                              common.label_file(folder, case.case_id, common.PNG_ENDING, test=case.test),
                              num_classes=len(LABELS))
    return f"{case.image.parent.name}/{case.image.name} -> {case.case_id}"


def convert_tn3k(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "TN3K",
                 rgb: bool = False, overwrite: bool = False, dry_run: bool = False, num_processes: int = 1) -> Path:
    """Convert the TN3K release at ``input_root`` (the ``tn3k`` folder); return the dataset folder."""
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    root = common.check_input_root(input_root, f"the {ROOT_FOLDER} folder")
    problems = common.Problems()
    trainval = discover_subset(root, TRAINVAL_IMAGES, TRAINVAL_MASKS, False, rgb, problems)
    test = discover_subset(root, TEST_IMAGES, TEST_MASKS, True, rgb, problems)
    splits = read_splits(root, trainval, problems)
    problems.raise_if_any()
    return common.write_dataset(target, trainval + test, convert_case, common.DatasetJson(
        channel_names=common.png_channel_names(rgb), labels=LABELS, file_ending=common.PNG_ENDING,
        dataset_name=dataset_name, reference=REFERENCE,
        description=f"TN3K thyroid nodules; JPEG masks thresholded at >= {MASK_THRESHOLD}; the test set with its "
                    f"labels in imagesTs/labelsTs; the release's five folds in splits_final.json"),
        splits=splits, overwrite=overwrite, dry_run=dry_run, num_processes=num_processes)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_tn3k``."""
    parser = common.converter_parser("nnunet_ext_convert_tn3k", "Convert TN3K (with its five folds) to nnU-Net.",
                                     default_name="TN3K", input_help=f"the {ROOT_FOLDER} folder")
    parser.add_argument("--rgb", action="store_true", help="keep R, G, B as three input channels (default: grey)")
    common.run_converter_cli(parser, argv, lambda a: convert_tn3k(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.rgb, a.overwrite, a.dry_run,
        a.num_processes))


if __name__ == "__main__":
    main()
