"""Convert BUSI (Breast Ultrasound Images, Al-Dhabyani et al. 2020) to an nnU-Net v2 raw dataset.

Real layout (Kaggle/Cairo University release ``Dataset_BUSI_with_GT``)::

    Dataset_BUSI_with_GT/benign/benign (1).png       benign (1)_mask.png     (437 images)
    Dataset_BUSI_with_GT/benign/benign (4)_mask_1.png                        (extra masks of one image)
    Dataset_BUSI_with_GT/malignant/malignant (1).png  malignant (1)_mask.png  (210 images)
    Dataset_BUSI_with_GT/normal/normal (1).png        normal (1)_mask.png     (133 images, all-zero masks)

Output, in ``<output>/Dataset{id:03d}_{name}/``: ``imagesTr/benign_0001_0000.png`` (greyscale),
``labelsTr/benign_0001.png`` (uint8, 0 background, 1 lesion), ``dataset.json``.

Quirks handled:

* names with spaces and parentheses and unpadded numbers: ``benign (1).png`` becomes the case id
  ``benign_0001``; images and masks are paired by category and number, never by sorted order;
* an image with several lesions has one mask per lesion, ``_mask``, ``_mask_1``, ``_mask_2``, ...:
  they are merged with OR (17 images in the release);
* images are PNGs read as RGB with grey content: written as one greyscale channel (``--rgb``
  keeps three channels instead);
* masks are mostly 8-bit 0/255, some RGBA or 3-channel RGB: the alpha channel is dropped, the colour
  channels must be equal (grey), and the values must be 0 or 255, since BUSI masks are binary
  (``--mask-threshold T`` binarises at > T instead, for copies whose masks were resampled);
* the papers segment benign + malignant (647 images); ``normal`` (all-zero masks) is added with
  ``--include-normal``. BUSI has no official split (and known duplicates): nnU-Net makes its own
  5-fold split.

Refused, each problem naming the file (all problems of a run reported together, nothing written):
a missing category folder, a PNG whose name is not ``<category> (N).png`` / ``<category> (N)_mask[_K].png``
(or names another category than its folder), an image without a mask and a mask without an image, a
mask of another size than its image, a colour mask, mask values other than 0/255, an unreadable file.

Command line::

    nnunet_ext_convert_busi Dataset_BUSI_with_GT -d 521 [-n BUSI] [--include-normal] [--rgb]
        [--mask-threshold T] [-o OUTPUT] [--overwrite] [--dry-run] [-np N]
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.dataset_conversion import common

ROOT_FOLDER = "Dataset_BUSI_with_GT"
CATEGORIES = ("benign", "malignant", "normal")
LESION_CATEGORIES = ("benign", "malignant")
LABELS = {"background": 0, "lesion": 1}
MASK_VALUES = (0, 255)
NAME = re.compile(r"(?P<category>[A-Za-z]+) \((?P<number>\d+)\)(?P<mask>_mask(?:_(?P<extra>\d+))?)?\.(?i:png)")
REFERENCE = ("Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. Data in Brief 28 "
             "(2020) 104863; https://scholar.cu.edu.eg/?q=afahmy/pages/dataset")


def image_name(category: str, number: int) -> str:
    """``benign (12).png``: the BUSI name of image ``number`` of ``category`` (numbers start at 1, no padding)."""
    return f"{category} ({number}).png"


def mask_name(category: str, number: int, extra: int = 0) -> str:
    """``benign (12)_mask.png``, or ``benign (12)_mask_1.png`` for the ``extra``-th additional mask."""
    return f"{category} ({number})_mask{f'_{extra}' if extra else ''}.png"


def case_id(category: str, number: int) -> str:
    """nnU-Net case id of a BUSI image, e.g. ``benign_0012``."""
    return f"{category}_{number:04d}"


@dataclass(frozen=True)
class BUSICase:
    """One BUSI image with all its masks, and how to convert it."""

    case_id: str
    image: Path
    masks: tuple[Path, ...]
    rgb: bool = False
    mask_threshold: int | None = None
    test: bool = False


def discover_category(folder: Path, category: str, problems: common.Problems) -> dict[int, tuple[Path, list[Path]]]:
    """Number -> (image, masks) of one category folder; bad names and unpaired files go to ``problems``."""
    image_numbers: dict[Path, int] = {}
    masks: dict[int, list[Path]] = {}
    for path in common.find_files(folder, (".png",)):
        match = NAME.fullmatch(path.name)
        if match is None or match["category"] != category:
            problems.add(path, f"{path} is not named like a BUSI {category} file: "
                               f"'{image_name(category, 1)}' or '{mask_name(category, 1)}' / "
                               f"'{mask_name(category, 1, 1)}'")
        elif match["mask"]:
            masks.setdefault(int(match["number"]), []).append(path)
        else:
            image_numbers[path] = int(match["number"])
    images = common.index_by(image_numbers, image_numbers.get, problems, "image number")
    first_masks = {number: files[0] for number, files in masks.items()}
    pairs = common.pair_files(images, first_masks, problems, image_word=f"image '{category} ({{key}}).png'",
                              label_word=f"mask '{category} ({{key}})_mask.png'")
    return {number: (image, masks[number]) for number, image, _ in pairs}


def discover(root: Path, categories: tuple[str, ...], problems: common.Problems, rgb: bool = False,
             mask_threshold: int | None = None) -> list[BUSICase]:
    """Every image of ``categories`` under the BUSI root with its masks, in category then number order."""
    cases = []
    for category in categories:
        folder = root / category
        if not folder.is_dir():
            problems.add(folder, f"{folder} is missing: a BUSI release has the folders {', '.join(CATEGORIES)}")
            continue
        for number, (image, masks) in sorted(discover_category(folder, category, problems).items()):
            cases.append(BUSICase(case_id(category, number), image, tuple(masks), rgb, mask_threshold))
    return cases


def read_grey_mask(path: Path, shape: tuple[int, ...], image: Path) -> np.ndarray:
    """A mask file as one grey channel of ``image``'s size (rows, columns); general, a candidate for ``common``.

    An alpha channel is dropped; the colour channels of an RGB(A) mask must be equal (a colour mask is
    refused rather than turned into luma, which would move its values).
    """
    array = common.read_png(path)
    if array.ndim == 3:
        colour = array[..., :3] if array.shape[2] >= 3 else array[..., :1]
        if not (colour == colour[..., :1]).all():
            raise common.ConversionError(f"{path} is a colour mask (its R, G, B channels differ); a grey mask "
                                         f"is expected")
        array = colour[..., 0]
    if array.shape != tuple(shape):
        raise common.ConversionError(f"size mismatch: {path} is {array.shape[1]}x{array.shape[0]} (width x height) "
                                     f"but its image {image} is {shape[1]}x{shape[0]}")
    return array


def read_mask(path: Path, shape: tuple[int, ...], image: Path, threshold: int | None) -> np.ndarray:
    """A BUSI mask as a boolean array: values 0/255 (or binarised at > ``threshold``)."""
    array = read_grey_mask(path, shape, image)
    if threshold is not None:
        return array > threshold
    return common.label_values_checked(array, MASK_VALUES, path) > 0


def convert_case(case: BUSICase, folder: Path | None) -> str:
    """Read one image and its masks, merge the masks with OR and (unless ``folder`` is None) write them."""
    image = common.read_png(case.image)
    shape = image.shape[:2]
    lesion = np.zeros(shape, dtype=bool)
    for mask in case.masks:
        lesion |= read_mask(mask, shape, case.image, case.mask_threshold)
    if folder is not None:
        common.write_png_image(image, folder, case.case_id, rgb=case.rgb, source=case.image)
        common.write_png_mask(lesion.astype(np.uint8), common.label_file(folder, case.case_id, common.PNG_ENDING),
                              num_classes=len(LABELS))
    masks = " + ".join(f"'{m.name}'" for m in case.masks)
    return f"'{case.image.name}' + {masks} -> {case.case_id}"


def convert_busi(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "BUSI",
                 include_normal: bool = False, rgb: bool = False, mask_threshold: int | None = None,
                 overwrite: bool = False, dry_run: bool = False, num_processes: int = 1) -> Path:
    """Convert the BUSI release at ``input_root`` (the ``Dataset_BUSI_with_GT`` folder); return the dataset folder."""
    if mask_threshold is not None and not 0 <= mask_threshold < 255:
        raise common.ConversionError(f"--mask-threshold must be in 0..254, got {mask_threshold}")
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    root = common.check_input_root(input_root, f"the {ROOT_FOLDER} folder")
    categories = CATEGORIES if include_normal else LESION_CATEGORIES
    problems = common.Problems()
    cases = discover(root, categories, problems, rgb, mask_threshold)
    problems.raise_if_any()
    return common.write_dataset(target, cases, convert_case, common.DatasetJson(
        channel_names=common.png_channel_names(rgb), labels=LABELS, file_ending=common.PNG_ENDING,
        dataset_name=dataset_name, reference=REFERENCE,
        description=f"BUSI breast ultrasound, categories {', '.join(categories)}; masks merged with OR"),
        overwrite=overwrite, dry_run=dry_run, num_processes=num_processes)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_busi``."""
    parser = common.converter_parser("nnunet_ext_convert_busi", "Convert BUSI (Dataset_BUSI_with_GT) to nnU-Net.",
                                     default_name="BUSI", input_help=f"the {ROOT_FOLDER} folder")
    parser.add_argument("--include-normal", action="store_true",
                        help="also convert the 'normal' images (all-zero masks); default: benign + malignant")
    parser.add_argument("--rgb", action="store_true", help="keep R, G, B as three input channels (default: grey)")
    parser.add_argument("--mask-threshold", type=int, default=None,
                        help="binarise masks at > T instead of requiring the values 0 and 255")
    common.run_converter_cli(parser, argv, lambda a: convert_busi(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.include_normal, a.rgb, a.mask_threshold,
        a.overwrite, a.dry_run, a.num_processes))


if __name__ == "__main__":
    main()
