"""Convert the Annotated Ultrasound Liver images (Xu et al. 2022; Kaggle orvile mirror) to an nnU-Net v2 dataset.

Layout (Zenodo 7272660 ``Benign.zip``, ``Malignant.zip``, ``Normal.zip``; the Kaggle mirror)::

    <root>/{Benign,Malignant,Normal}/image/<n>.jpg
    <root>/{Benign,Malignant,Normal}/segmentation/{liver,mass,outline}/<n>.json   (a JSON list of [x, y] points)

735 images: 200 benign, 435 malignant, 100 normal (no mass). Output, in
``<output>/Dataset{id:03d}_{name}/``: ``imagesTr/malignant_0374_0000.png`` (greyscale),
``labelsTr/malignant_0374.png`` and ``dataset.json``; ``--task liver`` (default, SPA-DCN-Net's
task): 0 background, 1 liver (the liver polygon; the mass polygon is not used); ``--task liver_mass``:
0 background, 1 liver, 2 mass, the mass painted over the liver. No official split: nnU-Net makes its
own five folds.

Quirks handled:

* an extra class level may appear after unzipping (``Benign/Benign/image/...``): every folder
  called ``image`` under the input folder is found, and its parent names the class
  (case-insensitive);
* numbers collide across classes (``Benign/image/1.jpg``, ``Malignant/image/1.jpg``): case ids
  carry the class, ``benign_0001``, ``malignant_0001`` (numbers zero padded to four digits; a
  non-numeric stem is kept, with characters other than ``[A-Za-z0-9-]`` as ``_``);
* ``outline`` is the scan fan, not anatomy: it is not used, except where the liver polygon was saved
  as ``outline`` instead of ``liver``. For the two such images known in the release (Malignant 229
  and 306, as corrected by UltraBench) the outline polygon is used as the liver when there is no
  ``liver`` file, with a warning; ``--liver-in-outline CLASS/N ...`` replaces that list (with no
  value: none);
* an image without a liver polygon (``Malignant/374.jpg`` in the release) is reported with a
  :class:`~nnunet_ext.dataset_conversion.common.ConversionWarning` and skipped;
* polygons are rasterised with PIL (pixels inside or on the polygon); images are JPEGs read as
  RGB with grey content and written as one grey channel (``--rgb`` keeps three).

Refused, each problem naming the file (all problems of a run reported together, nothing written):
no ``image`` folder, a class folder name other than Benign/Malignant/Normal, two ``image`` folders
of one class, two images with one stem, a polygon file without an image, a polygon file that is not
a JSON list of at least three finite ``[x, y]`` points, a polygon reaching farther than 5 % of the
image size (at least 2 px) beyond the image border (drawn on an image of another size), an
unreadable image.

Command line::

    nnunet_ext_convert_liverus LIVER_US_ROOT -d 533 [-n LiverUS] [--task liver|liver_mass]
        [--liver-in-outline CLASS/N ...] [--rgb] [-o OUTPUT] [--overwrite] [--dry-run] [-np N]
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nnunet_ext.dataset_conversion import common

CLASSES = ("Benign", "Malignant", "Normal")
IMAGE_FOLDER, SEGMENTATION_FOLDER = "image", "segmentation"
LIVER, MASS, OUTLINE = "liver", "mass", "outline"
IMAGE_ENDINGS = (".jpg", ".jpeg", ".png")
LIVER_IN_OUTLINE = ("Malignant/229", "Malignant/306")
TASK_LABELS = {"liver": {"background": 0, "liver": 1}, "liver_mass": {"background": 0, "liver": 1, "mass": 2}}
BORDER_MARGIN = 0.05
REFERENCE = ("Xu Y, Zheng B, Liu X, et al. Annotated Ultrasound Liver images. Zenodo (2022), "
             "doi:10.5281/zenodo.7272660; Kaggle mirror orvile/annotated-ultrasound-liver-images-dataset")


def case_id(class_name: str, stem: str) -> str:
    """``malignant_0374`` for ``Malignant/image/374.jpg``."""
    suffix = f"{int(stem):04d}" if stem.isdigit() else re.sub(r"[^A-Za-z0-9-]+", "_", stem)
    return f"{class_name.lower()}_{suffix}"


@dataclass(frozen=True)
class LiverCase:
    """One image with the polygon files to paint: ``(json file, label value)`` in painting order."""

    case_id: str
    image: Path
    polygons: tuple[tuple[Path, int], ...]
    num_classes: int
    rgb: bool = False
    test: bool = False


def class_folders(root: Path, problems: common.Problems) -> dict[str, Path]:
    """Class name -> the folder holding its ``image`` and ``segmentation`` folders, found recursively."""
    folders: dict[str, Path] = {}
    for folder in sorted({p.parent.parent for p in common.find_files(root, IMAGE_ENDINGS)
                          if p.parent.name == IMAGE_FOLDER}, key=common.natural_key):
        name = next((c for c in CLASSES if c.lower() == folder.name.lower()), None)
        if name is None:
            problems.add(folder, f"{folder / IMAGE_FOLDER} is not in a class folder: expected one of "
                                 f"{', '.join(CLASSES)}, got {folder.name!r}")
        elif name in folders:
            problems.add(folder, f"two image folders of class {name}: {folders[name] / IMAGE_FOLDER} and "
                                 f"{folder / IMAGE_FOLDER}")
        else:
            folders[name] = folder
    if not folders and not problems:
        problems.add(root, f"no {{{','.join(CLASSES)}}}/{IMAGE_FOLDER}/<n>.jpg files under {root}")
    return folders


def polygon_files(folder: Path, kind: str, problems: common.Problems) -> dict[str, Path]:
    """Stem -> JSON file in ``segmentation/<kind>`` of a class folder (empty when the folder is absent)."""
    return common.index_by(common.find_files(folder / SEGMENTATION_FOLDER / kind, (".json",)), lambda p: p.stem,
                           problems, f"{kind} polygon")


def discover_class(name: str, folder: Path, task: str, liver_in_outline: set[str], rgb: bool,
                   problems: common.Problems, notes: list[str]) -> list[LiverCase]:
    """The cases of one class folder; images without a liver polygon are skipped with a note."""
    images = common.index_by(common.find_files(folder / IMAGE_FOLDER, IMAGE_ENDINGS), lambda p: p.stem,
                             problems, "image")
    polygons = {kind: polygon_files(folder, kind, problems) for kind in (LIVER, MASS, OUTLINE)}
    for kind, files in polygons.items():
        for stem in sorted(files.keys() - images.keys(), key=common.natural_key):
            problems.add(files[stem], f"{files[stem]} has no image {stem}.jpg in {folder / IMAGE_FOLDER}")
    cases = []
    for stem in sorted(images, key=common.natural_key):
        liver = polygons[LIVER].get(stem)
        if liver is None and f"{name}/{stem}" in liver_in_outline and stem in polygons[OUTLINE]:
            liver = polygons[OUTLINE][stem]
            notes.append(f"{images[stem]}: no liver polygon; using {liver} as the liver (the liver polygon was "
                         f"saved as outline)")
        if liver is None:
            notes.append(f"{images[stem]} has no liver polygon ({folder / SEGMENTATION_FOLDER / LIVER / stem}.json): "
                         f"skipped")
            continue
        paint = [(liver, 1)]
        if task == "liver_mass" and stem in polygons[MASS]:
            paint.append((polygons[MASS][stem], 2))
        cases.append(LiverCase(case_id(name, stem), images[stem], tuple(paint), len(TASK_LABELS[task]), rgb))
    return cases


def read_polygon(path: Path) -> np.ndarray:
    """A polygon file as ``(n, 2)`` float ``(x, y)`` points; anything but a list of >= 3 finite points is refused."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise common.ConversionError(f"cannot read {path}: {error}") from None
    try:
        points = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        points = None
    if points is None or points.ndim != 2 or points.shape[1] != 2 or len(points) < 3 or not np.isfinite(points).all():
        raise common.ConversionError(f"{path} is not a polygon: expected a JSON list of at least three [x, y] "
                                     f"number pairs")
    return points


def rasterise(polygons: list[tuple[np.ndarray, int]], shape: tuple[int, int], paths: list[Path],
              image: Path) -> np.ndarray:
    """Paint ``(points, value)`` in order onto a zero ``(rows, cols)`` uint8 map; later polygons on top.

    A point farther than ``BORDER_MARGIN`` of the image size (at least 2 px) outside the image means the
    polygon was drawn on an image of another size: an error naming both files.
    """
    rows, cols = shape
    canvas = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(canvas)
    for (points, value), path in zip(polygons, paths):
        margin = np.maximum(2.0, BORDER_MARGIN * np.array([cols, rows]))
        outside = (points < -margin) | (points > np.array([cols - 1, rows - 1]) + margin)
        if outside.any():
            x, y = points[outside.any(axis=1)][0]
            raise common.ConversionError(f"size mismatch: {path} has the point ({x:g}, {y:g}) outside its image "
                                         f"{image} of {cols}x{rows} (width x height)")
        draw.polygon([(float(x), float(y)) for x, y in points], fill=int(value))
    return np.asarray(canvas, dtype=np.uint8)


def convert_case(case: LiverCase, folder: Path | None) -> str:
    """Read one image and its polygons, rasterise them and (unless ``folder`` is None) write both."""
    image = common.read_png(case.image)
    paths = [path for path, _ in case.polygons]
    label = rasterise([(read_polygon(path), value) for path, value in case.polygons], image.shape[:2], paths,
                      case.image)
    if folder is not None:
        common.write_png_image(image, folder, case.case_id, rgb=case.rgb, source=case.image)
        common.write_png_mask(label, common.label_file(folder, case.case_id, common.PNG_ENDING), case.num_classes)
    polygons = " + ".join(f"{p.parent.name}/{p.name}" for p in paths)
    return f"{case.image.parent.parent.name}/{case.image.name} + {polygons} -> {case.case_id}"


def convert_liverus(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "LiverUS",
                    task: str = "liver", liver_in_outline: tuple[str, ...] = LIVER_IN_OUTLINE, rgb: bool = False,
                    overwrite: bool = False, dry_run: bool = False, num_processes: int = 1) -> Path:
    """Convert the annotated liver ultrasound release at ``input_root``; return the dataset folder.

    Skipped images (no liver polygon) and liver polygons taken from ``outline`` are reported as
    ``ConversionWarning``.
    """
    if task not in TASK_LABELS:
        raise common.ConversionError(f"task must be one of {sorted(TASK_LABELS)}, got {task!r}")
    bad = [entry for entry in liver_in_outline if not re.fullmatch(rf"({'|'.join(CLASSES)})/[^/]+", entry)]
    if bad:
        raise common.ConversionError(f"--liver-in-outline takes CLASS/N with CLASS one of {', '.join(CLASSES)}, "
                                     f"got {bad}")
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    root = common.check_input_root(input_root, "the folder holding Benign/, Malignant/ and Normal/")
    problems, notes = common.Problems(), []
    cases = []
    for name, folder in class_folders(root, problems).items():
        cases += discover_class(name, folder, task, set(liver_in_outline), rgb, problems, notes)
    problems.raise_if_any()
    for note in notes:
        warnings.warn(note, common.ConversionWarning, stacklevel=2)
    return common.write_dataset(target, cases, convert_case, common.DatasetJson(
        channel_names=common.png_channel_names(rgb), labels=TASK_LABELS[task], file_ending=common.PNG_ENDING,
        dataset_name=dataset_name, reference=REFERENCE, license="CC BY 4.0",
        description=f"Annotated Ultrasound Liver images (benign, malignant, normal), {task} task from polygons"),
        overwrite=overwrite, dry_run=dry_run, num_processes=num_processes)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_liverus``."""
    parser = common.converter_parser("nnunet_ext_convert_liverus", "Convert the Annotated Ultrasound Liver images "
                                     "to nnU-Net.", default_name="LiverUS",
                                     input_help="the folder holding Benign/, Malignant/ and Normal/")
    parser.add_argument("--task", choices=sorted(TASK_LABELS), default="liver",
                        help="liver: liver vs background (default); liver_mass: liver and mass (painted over liver)")
    parser.add_argument("--liver-in-outline", nargs="*", default=list(LIVER_IN_OUTLINE), metavar="CLASS/N",
                        help="images whose liver polygon was saved as outline (default: "
                             f"{' '.join(LIVER_IN_OUTLINE)}); used only when there is no liver file")
    parser.add_argument("--rgb", action="store_true", help="keep R, G, B as three input channels (default: grey)")
    common.run_converter_cli(parser, argv, lambda a: convert_liverus(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.task, tuple(a.liver_in_outline), a.rgb,
        a.overwrite, a.dry_run, a.num_processes))


if __name__ == "__main__":
    main()
