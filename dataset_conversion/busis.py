"""Convert BUSIS (breast ultrasound image segmentation benchmark, Zhang et al. 2022) to an nnU-Net v2 raw dataset.

BUSIS (562 images) is distributed on request and its folder layout is not verified here: the
converter takes one folder of images and one folder of binary masks (both relative to the input
folder, or absolute), BMP or PNG, and a rule that names each image's mask::

    BUSIS/original/<stem>.bmp     BUSIS/GT/<mask stem>.png      (defaults: --images original --masks GT)

``--mask-stem`` is a ``str.format`` rule applied to the image stem, ``{stem}`` by default (same
stem), e.g. ``{stem}_GT`` for ``case1.bmp`` -> ``case1_GT.png``; image and mask extensions may
differ. Images and masks may also share one folder (``--images . --masks . --mask-stem '{stem}_mask'``):
a file whose stem is the mask stem of another file is then a mask. Case ids are ``busis_<stem>`` with
every run of characters other than letters and digits replaced by ``_`` (``case 1`` -> ``busis_case_1``).

Output, in ``<output>/Dataset{id:03d}_{name}/``: ``imagesTr/busis_<stem>_0000.png`` (greyscale;
``--rgb`` keeps three channels), ``labelsTr/busis_<stem>.png`` (uint8, 0 background, 1 lesion),
``dataset.json``. No official split: nnU-Net makes its own 5-fold split.

Masks are binarised at > 127 (they may hold anti-aliased or resampled grey values); a grey image
stored as RGB(A) with equal channels is read as grey (alpha dropped).

Refused, each problem naming the file (all problems reported together, nothing written): a missing
image or mask folder, a ``--mask-stem`` rule without ``{stem}``, two images (or masks) with one stem,
two stems giving one case id, an image without a mask and a mask without an image, a mask of another
size than its image, a colour mask, mask values beyond 8 bits (e.g. a 16-bit PNG), an unreadable file.

Command line::

    nnunet_ext_convert_busis BUSIS -d 522 [-n BUSIS] [--images original] [--masks GT] [--mask-stem '{stem}']
        [--rgb] [-o OUTPUT] [--overwrite] [--dry-run] [-np N]
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.dataset_conversion import common
from nnunet_ext.dataset_conversion.busi import read_grey_mask

IMAGE_FOLDER, MASK_FOLDER = "original", "GT"
DEFAULT_MASK_STEM = "{stem}"
ENDINGS = (".bmp", ".png")
LABELS = {"background": 0, "lesion": 1}
MASK_THRESHOLD = 127
REFERENCE = ("Zhang Y, Xian M, Cheng H-D, et al. BUSIS: A Benchmark for Breast Ultrasound Image Segmentation. "
             "Healthcare 10(4) (2022) 729")


def case_id(stem: str) -> str:
    """``busis_<stem>`` with every run of other characters than letters and digits replaced by ``_``."""
    return "busis_" + (re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_") or "_")


def mask_stem(rule: str, stem: str) -> str:
    """The mask stem of image ``stem`` by the ``--mask-stem`` rule; a rule without ``{stem}`` is refused."""
    try:
        named = rule.format(stem=stem)
    except (KeyError, IndexError, ValueError) as error:
        raise common.ConversionError(f"--mask-stem {rule!r} is not a valid rule: use '{{stem}}' for the image "
                                     f"stem, e.g. '{{stem}}_GT' ({error!r})") from None
    if named == rule.replace("{{", "{").replace("}}", "}"):
        raise common.ConversionError(f"--mask-stem {rule!r} does not contain '{{stem}}': every image would get "
                                     f"the same mask")
    return named


def braces(text: object) -> str:
    """``text`` with its braces doubled, for the ``str.format`` words of ``common.pair_files``."""
    return str(text).replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class BUSISCase:
    """One BUSIS image, its mask, and how to convert it."""

    case_id: str
    image: Path
    mask: Path
    rgb: bool = False
    test: bool = False


def folder_under(root: Path, folder: Path | str, what: str) -> Path:
    """``folder`` relative to ``root`` (or absolute), which must exist."""
    path = root / folder
    if not path.is_dir():
        raise common.ConversionError(f"{what} folder {path} does not exist (choose it with "
                                     f"{'--images' if what == 'image' else '--masks'})")
    return path


def discover(images_folder: Path, masks_folder: Path, rule: str, problems: common.Problems,
             rgb: bool = False) -> list[BUSISCase]:
    """Pair every image with the mask its stem names by ``rule``; problems go to ``problems``.

    Images and masks may share one folder: then a file whose stem is the mask stem of another file
    is a mask, not an image (``case1.png`` and ``case1_mask.png`` with ``--mask-stem '{stem}_mask'``).
    """
    image_files, mask_files = common.find_files(images_folder, ENDINGS), common.find_files(masks_folder, ENDINGS)
    if images_folder.resolve() == masks_folder.resolve():
        if mask_stem(rule, "x") == "x":
            raise common.ConversionError(f"images and masks are both in {images_folder}: give the masks' names "
                                         f"with a --mask-stem rule other than '{{stem}}', e.g. '{{stem}}_mask'")
        named = {mask_stem(rule, common.strip_ending(p, ENDINGS)) for p in image_files}
        mask_files = [p for p in image_files if common.strip_ending(p, ENDINGS) in named]
        image_files = [p for p in image_files if p not in mask_files]
    images = common.index_by(image_files, lambda p: mask_stem(rule, common.strip_ending(p, ENDINGS)), problems,
                             "image stem")
    masks = common.index_by(mask_files, lambda p: common.strip_ending(p, ENDINGS), problems, "mask stem")
    pairs = common.pair_files(images, masks, problems, image_word=f"image in {braces(images_folder)} (its mask stem "
                                                                  f"by --mask-stem {braces(repr(rule))} is {{key}})",
                              label_word=f"mask {{key}}.bmp/.png in {braces(masks_folder)} (by --mask-stem "
                                         f"{braces(repr(rule))})")
    cases = [BUSISCase(case_id(common.strip_ending(image, ENDINGS)), image, mask, rgb) for _, image, mask in pairs]
    common.index_by([case.image for case in cases], lambda p: case_id(common.strip_ending(p, ENDINGS)), problems,
                    "case id (stems that differ only in other characters than letters and digits)")
    if not images and not masks:
        problems.add(images_folder, f"no BMP or PNG images in {images_folder}")
    return cases


def read_mask(path: Path, shape: tuple[int, ...], image: Path) -> np.ndarray:
    """A BUSIS mask binarised at > 127: grey (see :func:`busi.read_grey_mask`), 8-bit, of ``image``'s size."""
    array = read_grey_mask(path, shape, image)
    if array.max(initial=0) > 255:
        raise common.ConversionError(f"{path} has mask values up to {int(array.max())}, outside 0..255: "
                                     f"8-bit masks expected (binarised at > {MASK_THRESHOLD})")
    return array > MASK_THRESHOLD


def convert_case(case: BUSISCase, folder: Path | None) -> str:
    """Read one image and its mask, binarise the mask and (unless ``folder`` is None) write both."""
    image = common.read_png(case.image)
    lesion = read_mask(case.mask, image.shape[:2], case.image)
    if folder is not None:
        common.write_png_image(image, folder, case.case_id, rgb=case.rgb, source=case.image)
        common.write_png_mask(lesion.astype(np.uint8), common.label_file(folder, case.case_id, common.PNG_ENDING),
                              num_classes=len(LABELS))
    return f"{case.image.name} + {case.mask.name} -> {case.case_id}"


def convert_busis(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "BUSIS",
                  images: Path | str = IMAGE_FOLDER, masks: Path | str = MASK_FOLDER, rule: str = DEFAULT_MASK_STEM,
                  rgb: bool = False, overwrite: bool = False, dry_run: bool = False, num_processes: int = 1) -> Path:
    """Convert the BUSIS images and masks under ``input_root``; return the dataset folder."""
    mask_stem(rule, "x")
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    root = common.check_input_root(input_root, "the folder holding the BUSIS image and mask folders")
    problems = common.Problems()
    images_folder = problems.check(root / images, folder_under, root, images, "image")
    masks_folder = problems.check(root / masks, folder_under, root, masks, "mask")
    problems.raise_if_any()
    cases = discover(images_folder, masks_folder, rule, problems, rgb)
    problems.raise_if_any()
    return common.write_dataset(target, cases, convert_case, common.DatasetJson(
        channel_names=common.png_channel_names(rgb), labels=LABELS, file_ending=common.PNG_ENDING,
        dataset_name=dataset_name, reference=REFERENCE,
        description=f"BUSIS breast ultrasound; masks binarised at > {MASK_THRESHOLD}"),
        overwrite=overwrite, dry_run=dry_run, num_processes=num_processes)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_busis``."""
    parser = common.converter_parser("nnunet_ext_convert_busis", "Convert BUSIS images and masks to nnU-Net.",
                                     default_name="BUSIS", input_help="the folder holding the image and mask folders")
    parser.add_argument("--images", default=IMAGE_FOLDER,
                        help=f"image folder, relative to INPUT or absolute (default {IMAGE_FOLDER})")
    parser.add_argument("--masks", default=MASK_FOLDER,
                        help=f"mask folder, relative to INPUT or absolute (default {MASK_FOLDER})")
    parser.add_argument("--mask-stem", default=DEFAULT_MASK_STEM,
                        help="the mask stem of an image, a rule with {stem} = the image stem, e.g. '{stem}_GT' "
                             "(default '{stem}')")
    parser.add_argument("--rgb", action="store_true", help="keep R, G, B as three input channels (default: grey)")
    common.run_converter_cli(parser, argv, lambda a: convert_busis(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.images, a.masks, a.mask_stem, a.rgb,
        a.overwrite, a.dry_run, a.num_processes))


if __name__ == "__main__":
    main()
