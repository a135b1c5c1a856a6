"""Convert the Open Kidney Ultrasound Data Set (kidneyUS, Singla et al. 2023) to an nnU-Net v2 raw dataset.

Layout (images from the registration release, labels from github.com/rsingla92/kidneyUS)::

    <root>/<any folder>/<n>_<DICOM id>_anon.png             B-mode images (grey, or RGB with grey content)
    <root>/labels/reviewed_masks_{1,2}/capsule/<name>.png   uint8 L masks {0 background, 1 capsule}
    <root>/labels/reviewed_masks_{1,2}/regions/<name>.png   {0, 1 central echo complex, 2 medulla, 3 cortex}
    <root>/labels/reviewed_labels_{1,2}.csv                 the same polygons as a VGG Image Annotator export

Output, in ``<output>/Dataset{id:03d}_{name}/``: ``imagesTr/kidneyus_110_IM-0026-0001_0000.png``
(greyscale), ``labelsTr/kidneyus_110_IM-0026-0001.png`` and ``dataset.json`` with the labels of the
chosen task (``--task capsule``: background, capsule; ``--task regions``: background,
central_echo_complex, medulla, cortex). The case id is ``kidneyus_`` + the file name without ``_anon``.
There is no official split: nnU-Net makes its own five folds.

Quirks handled:

* two annotators: ``--annotator 1`` (default) or ``2`` picks ``reviewed_masks_1`` or ``_2``; the
  masks are used, the CSVs (the same polygons) are not read;
* 534 annotated files but 514 unique DICOM ids (the second underscore field): the same DICOM image
  appears under two or three numbers (``110_``, ``402_``, ``414_IM-0026-0001``), and the image
  release has only one of them. Per DICOM id the highest-numbered file with both an image and a
  mask is kept (the one the 514-image release keeps); the others are dropped and reported with a
  :class:`~nnunet_ext.dataset_conversion.common.ConversionWarning`, so a mask whose image is missing
  is no error when its DICOM id is kept under another number;
* empty masks (the annotator drew nothing, e.g. ``299_IM-0068-0001``) are kept as negative cases,
  or dropped and reported with ``--drop-empty``;
* images are grey or RGB with grey content: written as one grey channel (true colour would become
  ITU-R 601 luma; ``--rgb`` keeps three channels);
* images are found anywhere under the input folder (outside the ``reviewed_masks_*`` folders) by
  their name ``<n>_<DICOM id>_anon.png`` (other files, e.g. the repository's logo, are ignored), so
  both ``<root>/images/`` and the repository's former ``labels/images/`` work.

Refused, each problem naming the file (all problems of a run reported together, nothing written):
no ``reviewed_masks_N/<task>`` folder (or two), a mask not named ``<n>_<DICOM id>_anon.png``, the
same image name in two folders, an image without a mask and a mask without an image (for its
DICOM id), a mask of another size than its image, a mask with several channels, label values
outside the task's labels, an unreadable file.

Command line::

    nnunet_ext_convert_kidneyus KIDNEYUS_ROOT -d 531 [-n KidneyUS] [--task capsule|regions]
        [--annotator 1|2] [--drop-empty] [--rgb] [-o OUTPUT] [--overwrite] [--dry-run] [-np N]
"""
from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.dataset_conversion import common

IMAGE_NAME = re.compile(r"(\d+)_([^_]+)_anon")
IMAGE_ENDINGS = (".png",)
MASKS_FOLDER = "reviewed_masks_{annotator}"
LABELS_CSV = "reviewed_labels_{annotator}.csv"
ANNOTATORS = (1, 2)
TASK_LABELS = {
    "capsule": {"background": 0, "capsule": 1},
    "regions": {"background": 0, "central_echo_complex": 1, "medulla": 2, "cortex": 3},
}
ANATOMY = {"Capsule": ("capsule", 1), "Central Echo Complex": ("regions", 1), "Medulla": ("regions", 2),
           "Cortex": ("regions", 3)}
REFERENCE = ("Singla R, Ringstrom C, Hu G, Lessoway V, Reid J, Nguan C, Rohling R. The Open Kidney Ultrasound "
             "Data Set. ASMUS 2023 (arXiv:2206.06657); https://github.com/rsingla92/kidneyUS")


def case_id(stem: str) -> str:
    """``kidneyus_110_IM-0026-0001`` for ``110_IM-0026-0001_anon.png``."""
    return f"kidneyus_{stem.removesuffix('_anon')}"


def parse_name(stem: str) -> tuple[int, str] | None:
    """(number, DICOM id) of a kidneyUS file stem ``<n>_<DICOM id>_anon``; None for other names."""
    match = IMAGE_NAME.fullmatch(stem)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass(frozen=True)
class KidneyCase:
    """One kidneyUS image with the chosen annotator's mask of the chosen task."""

    case_id: str
    image: Path
    mask: Path
    num_classes: int
    rgb: bool = False
    test: bool = False


def find_folders(root: Path, name: str) -> list[Path]:
    """Every folder called ``name`` under ``root`` (hidden folders and ``__MACOSX`` not entered); general."""
    found = []
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not common.is_hidden(d))
        found += [Path(folder) / d for d in subfolders if d == name]
    return found


def mask_folder(root: Path, annotator: int, task: str) -> Path:
    """The one ``reviewed_masks_<annotator>/<task>`` folder under ``root``."""
    name = MASKS_FOLDER.format(annotator=annotator)
    folders = [f / task for f in find_folders(root, name) if (f / task).is_dir()]
    if not folders:
        raise common.ConversionError(f"no {name}/{task} folder under {root}: pass the kidneyUS folder that holds "
                                     f"labels/{name}/{task}/")
    if len(folders) > 1:
        raise common.ConversionError(f"{len(folders)} {name}/{task} folders under {root} ({folders[0]}, "
                                     f"{folders[1]}): pass a folder with one kidneyUS release")
    return folders[0]


def find_images(root: Path, problems: common.Problems) -> dict[str, Path]:
    """Stem -> image for every ``<n>_<DICOM id>_anon.png`` under ``root`` outside the ``reviewed_masks_*`` folders."""
    masks = re.compile(MASKS_FOLDER.format(annotator=r"\d+"))
    files = [p for p in common.find_files(root, IMAGE_ENDINGS) if parse_name(common.strip_ending(p, IMAGE_ENDINGS))
             and not any(masks.fullmatch(part) for part in p.relative_to(root).parts)]
    return common.index_by(files, lambda p: common.strip_ending(p, IMAGE_ENDINGS), problems, "image name")


def find_masks(folder: Path, problems: common.Problems) -> dict[str, Path]:
    """Stem -> mask in a ``reviewed_masks_N/<task>`` folder; a file with another name is a problem."""
    masks = {}
    for path in common.find_files(folder):
        stem = common.strip_ending(path, IMAGE_ENDINGS)
        if parse_name(stem) is None or not path.name.lower().endswith(IMAGE_ENDINGS):
            problems.add(path, f"{path} is not named like a kidneyUS mask '<n>_<DICOM id>_anon.png'")
        else:
            masks[stem] = path
    return masks


def select_cases(images: dict[str, Path], masks: dict[str, Path],
                 problems: common.Problems) -> tuple[list[str], list[str]]:
    """The stems to convert (one per DICOM id) and one note per dropped duplicate group.

    Per DICOM id the highest-numbered stem with an image and a mask is kept; without such a stem every
    file of the DICOM id is a problem (an image without a mask, a mask without an image).
    """
    by_dicom: dict[str, list[str]] = defaultdict(list)
    for stem in images.keys() | masks.keys():
        by_dicom[parse_name(stem)[1]].append(stem)
    kept, notes = [], []
    for dicom_id, stems in sorted(by_dicom.items()):
        complete = [s for s in stems if s in images and s in masks]
        if not complete:
            for stem in sorted(stems, key=common.natural_key):
                if stem in images:
                    problems.add(images[stem], f"{images[stem]} has no mask {stem}.png in the chosen masks folder")
                else:
                    problems.add(masks[stem], f"{masks[stem]} has no image {stem}.png (and no other file of "
                                              f"DICOM id {dicom_id} has both)")
            continue
        keep = max(complete, key=lambda s: parse_name(s)[0])
        dropped = sorted(set(stems) - {keep}, key=common.natural_key)
        if dropped:
            notes.append(f"DICOM id {dicom_id} appears as {len(stems)} files: kept {keep}.png, dropped "
                         f"duplicate(s) {', '.join(s + '.png' for s in dropped)}")
        kept.append(keep)
    return sorted(kept, key=common.natural_key), notes


def read_mask(path: Path) -> np.ndarray:
    """A kidneyUS mask as a 2D array; a mask with colour channels is refused rather than guessed."""
    array = common.read_png(path)
    if array.ndim != 2:
        raise common.ConversionError(f"{path} has {array.shape[2]} channels; a kidneyUS mask is a single-channel "
                                     f"(L) image of label values")
    return array


def is_empty(path: Path) -> bool:
    """True when the mask has no foreground pixel."""
    return not read_mask(path).any()


def convert_case(case: KidneyCase, folder: Path | None) -> str:
    """Read and check one image and its mask; write them unless ``folder`` is None (dry run)."""
    image = common.read_png(case.image)
    mask = read_mask(case.mask)
    if mask.shape != image.shape[:2]:
        raise common.ConversionError(f"size mismatch: {case.mask} is {mask.shape[1]}x{mask.shape[0]} (width x "
                                     f"height) but its image {case.image} is {image.shape[1]}x{image.shape[0]}")
    label = common.label_values_checked(mask, range(case.num_classes), case.mask)
    if folder is not None:
        common.write_png_image(image, folder, case.case_id, rgb=case.rgb, source=case.image)
        common.write_png_mask(label, common.label_file(folder, case.case_id, common.PNG_ENDING), case.num_classes)
    return f"{case.image.name} + {case.mask.parent.parent.name}/{case.mask.parent.name} -> {case.case_id}"


def convert_kidneyus(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "KidneyUS",
                     task: str = "capsule", annotator: int = 1, drop_empty: bool = False, rgb: bool = False,
                     overwrite: bool = False, dry_run: bool = False, num_processes: int = 1) -> Path:
    """Convert the kidneyUS release at ``input_root`` (see the module docstring); return the dataset folder.

    Dropped duplicates and (with ``drop_empty``) empty masks are reported as ``ConversionWarning``.
    """
    if task not in TASK_LABELS:
        raise common.ConversionError(f"task must be one of {sorted(TASK_LABELS)}, got {task!r}")
    if annotator not in ANNOTATORS:
        raise common.ConversionError(f"annotator must be 1 or 2, got {annotator}")
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    root = common.check_input_root(input_root, "the kidneyUS folder (images and labels/)")
    problems = common.Problems()
    masks = find_masks(mask_folder(root, annotator, task), problems)
    images = find_images(root, problems)
    stems, notes = select_cases(images, masks, problems)
    problems.raise_if_any()
    if drop_empty:
        empty = [s for s in stems if problems.check(masks[s], is_empty, masks[s])]
        problems.raise_if_any()
        notes += [f"{masks[s]} is empty: dropped (--drop-empty)" for s in empty]
        stems = [s for s in stems if s not in empty]
    for note in notes:
        warnings.warn(note, common.ConversionWarning, stacklevel=2)
    labels = TASK_LABELS[task]
    cases = [KidneyCase(case_id(s), images[s], masks[s], len(labels), rgb) for s in stems]
    return common.write_dataset(target, cases, convert_case, common.DatasetJson(
        channel_names=common.png_channel_names(rgb), labels=labels, file_ending=common.PNG_ENDING,
        dataset_name=dataset_name, reference=REFERENCE, license="CC BY-NC-SA (non-commercial use only)",
        description=f"Open Kidney Ultrasound, {task} masks of annotator {annotator}; one file per DICOM id"
                    f"{', empty masks dropped' if drop_empty else ''}"),
        overwrite=overwrite, dry_run=dry_run, num_processes=num_processes)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_kidneyus``."""
    parser = common.converter_parser("nnunet_ext_convert_kidneyus", "Convert the Open Kidney Ultrasound Data Set "
                                     "(kidneyUS) to nnU-Net.", default_name="KidneyUS",
                                     input_help="the kidneyUS folder holding the images and labels/")
    parser.add_argument("--task", choices=sorted(TASK_LABELS), default="capsule",
                        help="capsule: kidney vs background (default); regions: central echo complex, medulla, "
                             "cortex")
    parser.add_argument("--annotator", type=int, choices=ANNOTATORS, default=1,
                        help="whose masks: reviewed_masks_1 (default) or reviewed_masks_2")
    parser.add_argument("--drop-empty", action="store_true",
                        help="drop images whose mask is empty (default: keep them as negative cases)")
    parser.add_argument("--rgb", action="store_true", help="keep R, G, B as three input channels (default: grey)")
    common.run_converter_cli(parser, argv, lambda a: convert_kidneyus(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.task, a.annotator, a.drop_empty, a.rgb,
        a.overwrite, a.dry_run, a.num_processes))


if __name__ == "__main__":
    main()
