"""Shared toolkit of the dataset converters: discover, validate, write atomically, refuse clashes, one CLI.

A converter is a small module that finds its cases, checks them and converts one case at a time; this
module does everything else the same way for every dataset. The shape of a converter::

    from nnunet_ext.dataset_conversion import common

    @dataclass(frozen=True)
    class MyCase:                      # any picklable object with .case_id and .test
        case_id: str
        image: Path
        label: Path | None
        test: bool = False

    def convert_case(case: MyCase, folder: Path | None) -> str:
        image = common.read_png(case.image)            # full read; damaged files raise ConversionError
        mask = common.read_png(case.label) // 255       # (only for training cases)
        if folder is not None:                          # None: --dry-run, only check
            common.write_png_image(image, folder, case.case_id, case.test, source=case.image)
            common.write_png_mask(mask, common.label_file(folder, case.case_id, ".png"), num_classes=2)
        return f"{case.image.name} -> {case.case_id}"

    def convert(input_root, dataset_id, output_folder, dataset_name="Mine", overwrite=False, dry_run=False,
                num_processes=1) -> Path:
        target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
        files = common.find_files(common.check_input_root(input_root, "the release folder"), (".png",))
        problems = common.Problems()
        cases = ...                                     # pair files, problems.add(path, "has no mask") ...
        return common.write_dataset(target, cases, convert_case, common.DatasetJson(
            channel_names={0: "US"}, labels={"background": 0, "lesion": 1}, file_ending=".png",
            dataset_name=dataset_name), overwrite=overwrite, dry_run=dry_run, num_processes=num_processes,
            problems=problems)                          # every bad file at once, nothing written if any

    def main(argv=None) -> None:
        parser = common.converter_parser("nnunet_ext_convert_mine", "Convert Mine.", default_name="Mine")
        common.run_converter_cli(parser, argv, lambda a: convert(a.input_root, a.dataset_id, a.output_folder,
                                 a.dataset_name, a.overwrite, a.dry_run, a.num_processes))

Guarantees (issue 14): input files are read completely (a truncated NIfTI, a truncated PNG or non-finite voxels
are errors naming the file), problems are collected and reported together, every write is verified (re-read
header/pixels and sizes), the dataset is built in a hidden ``.Dataset..partial-<host>-<pid>-<hex>`` sibling renamed
into place only when complete, SIGINT/SIGTERM/SIGHUP remove it and exit ``128 + signal`` with one line, a
partial folder left by SIGKILL is removed at the next run (or named with the command that removes it), and a
dataset id/name already used by another dataset in nnUNet_raw, nnUNet_preprocessed or nnUNet_results is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from PIL import Image
from tqdm import tqdm

NIFTI_ENDING = ".nii.gz"
PNG_ENDING = ".png"
HIDDEN_FOLDERS = ("__MACOSX",)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SPACING_TOLERANCE_MM = 1e-3
ORIGIN_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4
_PARTIAL = re.compile(r"\.(Dataset\d{3}_.+)\.(partial|old)-(.+)-(\d+)-([0-9a-f]{8})")


# ----------------------------------------------------------------------------------------------- errors
class ConversionError(ValueError):
    """An input or output problem that stops the conversion; the message names the file and the problem."""


class WriteError(ConversionError):
    """A write that failed or could not be verified (disk full, file size limit): aborts at once."""


class ConversionWarning(UserWarning):
    """Something the converter fixed (e.g. a label header replaced); the command line prints ``WARNING: ...``."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; raised in the main thread so that every ``finally`` cleans up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Problems:
    """Collects every problem found during validation so that the user sees all bad files at once.

    ``add(path, message)`` records one problem; the message is used as is when it already names the file,
    otherwise it is prefixed with ``path: ``. ``check(path, function, *args)`` runs a check and records its
    :class:`ConversionError` instead of raising (returns the result, or None on a problem).
    ``raise_if_any()`` raises one :class:`ConversionError` listing all problems (one line for one problem).
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, path: Path | str | None, message: str) -> None:
        if path is None or str(path) in message:
            self.messages.append(message)
        else:
            self.messages.append(f"{path}: {message}")

    def check(self, path: Path | str | None, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except WriteError:
            raise
        except ConversionError as error:
            self.add(path, str(error))
            return None

    def __len__(self) -> int:
        return len(self.messages)

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise ConversionError(self.messages[0])
        if self.messages:
            raise ConversionError(f"{len(self.messages)} problems, nothing was written:\n"
                                  + "\n".join(f"  - {m}" for m in self.messages))


# -------------------------------------------------------------------------------------------- discovery
def check_input_root(path: Path | str, what: str = "the dataset's release folder") -> Path:
    """The input root as a Path; a missing path, a file (e.g. an unextracted archive) each get their message."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists() or path.is_symlink():
        hint = " (extract the archive first)" if re.search(r"\.(zip|tar|tgz|gz|7z|rar)$", path.name) else ""
        raise ConversionError(f"input {path} is a file, not a folder{hint}: pass {what}")
    raise ConversionError(f"input folder {path} does not exist")


def is_hidden(name: str) -> bool:
    """Hidden files/folders, AppleDouble ``._*`` files and ``__MACOSX`` folders of macOS archives."""
    return name.startswith(".") or name in HIDDEN_FOLDERS


def natural_key(text: str | Path) -> tuple:
    """Sort key that orders numbers by value: ``case2`` before ``case10``; compares full paths part by part."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", str(text)) if part)


def find_files(root: Path, endings: Sequence[str] | None = None) -> list[Path]:
    """Every non-hidden file under ``root`` (recursively, symlinks followed) whose name ends with one of
    ``endings`` (case-insensitive; None: any), in natural order. Hidden folders/``__MACOSX`` are not entered."""
    lowered = tuple(e.lower() for e in endings) if endings is not None else None
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not is_hidden(d)]
        found += [Path(folder) / name for name in files
                  if not is_hidden(name) and (lowered is None or name.lower().endswith(lowered))]
    return sorted(found, key=natural_key)


def strip_ending(path: Path | str, endings: Sequence[str] = (".nii.gz", ".nii")) -> str:
    """File name without the first matching ending of ``endings`` (else without its last suffix)."""
    name = Path(path).name
    for ending in endings:
        if name.lower().endswith(ending.lower()):
            return name[:-len(ending)]
    return Path(name).stem


def index_by(files: Iterable[Path], key: Callable[[Path], str | int | None], problems: Problems,
             what: str = "case") -> dict:
    """Map ``key(file)`` -> file for every file whose key is not None; two files with one key are a problem
    (``duplicate {what} K: A and B``), the first one is kept."""
    found: dict = {}
    for path in files:
        k = key(path)
        if k is None:
            continue
        if k in found:
            problems.add(path, f"duplicate {what} {k}: {found[k]} and {path}")
            continue
        found[k] = path
    return found


def pair_files(images: dict, labels: dict, problems: Problems, image_word: str = "image",
               label_word: str = "label") -> list[tuple[Any, Path, Path]]:
    """Pair two ``key -> file`` maps by key (never by sorted position); an unpaired file on either side is a
    problem ``<file> has no <word>``, where the words may contain ``{key}`` (e.g. ``"segmentation-{key}.nii"``).
    Returns ``(key, image, label)`` in natural key order."""
    for k in sorted(images.keys() - labels.keys(), key=natural_key):
        problems.add(images[k], f"{images[k]} has no {label_word.format(key=k)}")
    for k in sorted(labels.keys() - images.keys(), key=natural_key):
        problems.add(labels[k], f"{labels[k]} has no {image_word.format(key=k)}")
    return [(k, images[k], labels[k]) for k in sorted(images.keys() & labels.keys(), key=natural_key)]


# ---------------------------------------------------------------------------------------------- reading
def _sitk_message(error: RuntimeError) -> str:
    """The last, informative line of a SimpleITK exception, without its ``sitk::ERROR:`` prefix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1].removeprefix("sitk::ERROR:").strip() if lines else repr(error)


def is_nifti(path: Path | str) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file holding fewer voxel bytes than its header promises (a truncated copy or a failed
    write; SimpleITK would zero-fill the rest) or a broken gzip stream. The whole file is read."""
    try:
        image = nibabel.load(str(path))
    except Exception as error:  # nibabel raises many types for garbage headers
        raise ConversionError(f"cannot read {path}: not a valid NIfTI file ({error})") from None
    # the file's vox_offset (the loaded header copy has it reset to 0) + the voxel bytes
    expected = int(image.dataobj.offset) + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
    if str(path).lower().endswith(".gz"):
        size = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read1(1 << 16):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as error:
            raise ConversionError(f"{path} is truncated or corrupt: its gzip stream breaks off after {size} "
                                  f"bytes ({error}); the header promises {expected} bytes") from None
    else:
        size = path.stat().st_size
    if size < expected:
        raise ConversionError(f"{path} is truncated: its header promises {expected} bytes (header and voxels) "
                              f"but the file holds {size}")


def read_header(path: Path, dimension: int = 3) -> Header:
    """Size and geometry of an image without its voxels; it must be a single-channel ``dimension``-D image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ConversionError(f"cannot read {path}: {_sitk_message(error)}") from None
    if reader.GetDimension() != dimension or reader.GetNumberOfComponents() != 1:
        raise ConversionError(f"{path} is not a single-channel {dimension}D image (dimension "
                              f"{reader.GetDimension()}, {reader.GetNumberOfComponents()} components)")
    return Header(path, reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def _read_complete(path: Path) -> sitk.Image:
    """All voxels of ``path`` via SimpleITK, after checking that a NIfTI file is complete."""
    if is_nifti(path):
        check_nifti_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ConversionError(f"cannot read {path}: {_sitk_message(error)}") from None


def non_finite_voxels(path: Path, image: sitk.Image) -> np.ndarray | None:
    """Mask (numpy order, like ``sitk.GetArrayFromImage``) of the NaN/inf voxels stored in ``path``, or None.

    SimpleITK's NIfTI reader turns NaN and inf into 0 without a word (issue 14 item 4), so float NIfTI data is
    inspected as stored, with nibabel; other formats through the SimpleITK voxels.
    """
    if is_nifti(path) and nibabel.load(str(path)).header.get_data_dtype().kind in "fc":
        stored = np.asanyarray(nibabel.load(str(path)).dataobj)
        bad = ~np.isfinite(stored).T
    elif image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        bad = ~np.isfinite(sitk.GetArrayViewFromImage(image))
    else:
        return None
    return bad if bad.any() else None


def read_image(path: Path, nan_to: float | None = None) -> sitk.Image:
    """Read a whole medical image with SimpleITK after checking that a NIfTI file is complete.

    Non-finite voxels (NaN, +-inf) are an error naming the file and their count, unless ``nan_to`` is given:
    then they are replaced by it (the ``--nan-to`` option of the converters).
    """
    image = _read_complete(path)
    bad = non_finite_voxels(path, image)
    if bad is None:
        return image
    if nan_to is None:
        raise ConversionError(f"{path} has {int(bad.sum())} non-finite voxels (NaN or inf); fix the file "
                              f"or pass --nan-to VALUE to replace them")
    array = sitk.GetArrayFromImage(image)
    if array.shape != bad.shape:
        raise ConversionError(f"{path}: cannot replace non-finite voxels of a {array.shape} multi-component image")
    array[bad] = nan_to
    fixed = sitk.GetImageFromArray(array)
    fixed.CopyInformation(image)
    return fixed


def read_label(path: Path, allowed: Sequence[int]) -> sitk.Image:
    """Read a whole label image (NIfTI completeness checked) as uint8 with its geometry; NaN/inf, non-integral
    values and values outside ``allowed`` are errors naming the file and the values."""
    image = _read_complete(path)
    bad = non_finite_voxels(path, image)
    if bad is not None:
        raise ConversionError(f"{path} has non-finite label values (NaN or inf) in {int(bad.sum())} voxels")
    label = sitk.GetImageFromArray(label_values_checked(sitk.GetArrayViewFromImage(image), allowed, path))
    label.CopyInformation(image)
    return label


def label_values_checked(array: np.ndarray, allowed: Sequence[int], path: Path | str) -> np.ndarray:
    """``array`` as uint8 after checking it holds only integral values from ``allowed``."""
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ConversionError(f"{path} has non-finite label values (NaN or inf)")
        if not np.array_equal(array, np.round(array)):
            raise ConversionError(f"{path} has non-integral label values, e.g. "
                                  f"{float(array[array != np.round(array)].flat[0]):g}")
    unexpected = np.unique(array[~np.isin(array, allowed)])
    if unexpected.size:
        shown = [int(v) if float(v).is_integer() else float(v) for v in unexpected[:10]]
        raise ConversionError(f"{path} has label values {shown} outside {sorted(allowed)}")
    return array.astype(np.uint8)


def read_png(path: Path, mode: str | None = None) -> np.ndarray:
    """Read a 2D image (PNG, JPEG, BMP, TIFF) completely with PIL; a truncated or unreadable file raises.

    ``mode`` converts first (PIL modes: ``"L"`` grey, ``"RGB"``, ``"RGBA"``); None keeps the stored mode.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert(mode) if mode else image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ConversionError(f"cannot read {path}: {error}") from None


def to_grey(array: np.ndarray, path: Path | str) -> np.ndarray:
    """A single-channel image: grey as is, RGB(A) whose colour channels are equal -> one of them, true colour
    -> ITU-R 601 luma (PIL's ``L`` conversion); the alpha channel is dropped."""
    if array.ndim == 2:
        return array
    if array.ndim != 3 or array.shape[2] not in (2, 3, 4):
        raise ConversionError(f"{path} has an unexpected image shape {array.shape}")
    if array.shape[2] == 2:  # grey + alpha
        return array[..., 0]
    rgb = array[..., :3]
    if (rgb == rgb[..., :1]).all():
        return np.ascontiguousarray(rgb[..., 0])
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Header:
    """Size and geometry of one image file, as SimpleITK reads them (x, y, z order)."""

    path: Path
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def is_identity(self) -> bool:
        """Spacing 1, origin 0, identity direction (a missing or default header)."""
        dim = len(self.size)
        return (np.allclose(self.spacing, 1.0, rtol=0, atol=SPACING_TOLERANCE_MM)
                and np.allclose(self.origin, 0.0, rtol=0, atol=ORIGIN_TOLERANCE_MM)
                and np.allclose(self.direction, np.eye(dim).ravel(), rtol=0, atol=DIRECTION_TOLERANCE))


@dataclass(frozen=True)
class GeometryFix:
    """How a label is put onto its volume's grid: ``"same"`` (headers agree within float noise: the volume's
    geometry is copied), ``"copy"`` (only the origin differs: the label's voxels are the volume's, the volume
    header is copied, with a warning) or ``"reorient"`` (axes flipped/permuted: the voxels are moved exactly
    onto the volume grid by nearest-neighbour resampling, with a warning)."""

    action: str
    reason: str = ""


def geometry_fix(volume: Header, label: Header) -> GeometryFix:
    """Decide how ``label`` goes onto ``volume``'s grid; a real disagreement that cannot be mapped exactly
    raises :class:`ConversionError` with the reason (issue 14 item 3). Never copies a header over a differing
    direction: a flipped or permuted axis is resampled, which is exact because the grids' voxel centres
    coincide (checked at the corners)."""
    dim = len(volume.size)
    dv = np.reshape(volume.direction, (dim, dim))
    dl = np.reshape(label.direction, (dim, dim))
    if np.allclose(dv, dl, rtol=0, atol=DIRECTION_TOLERANCE):
        if volume.size != label.size:
            raise ConversionError(f"size mismatch: {volume.path} is {volume.size} but {label.path} is "
                                  f"{label.size} (x, y, z)")
        if not np.allclose(volume.spacing, label.spacing, rtol=0, atol=SPACING_TOLERANCE_MM):
            raise ConversionError(f"spacing mismatch: {volume.path} has {volume.spacing} but "
                                  f"{label.path} has {label.spacing}")
        if np.allclose(volume.origin, label.origin, rtol=0, atol=ORIGIN_TOLERANCE_MM):
            return GeometryFix("same")
        return GeometryFix("copy", f"origin/direction of {label.path}: its origin {_fmt(label.origin)} differs "
                                   f"from {_fmt(volume.origin)} of {volume.path.name} (same direction, spacing and "
                                   f"size); copying the volume geometry onto the label")
    problem = _reorientation_problem(volume, label, dv, dl)
    if problem:
        raise ConversionError(f"direction mismatch: {label.path} has direction {_fmt(label.direction)} but "
                              f"{volume.path} has {_fmt(volume.direction)}, and the label cannot be mapped exactly "
                              f"onto the volume grid: {problem}")
    return GeometryFix("reorient", f"the direction of {label.path} ({_fmt(label.direction)}) differs from "
                                   f"{volume.path.name} ({_fmt(volume.direction)}); resampled the label exactly "
                                   f"onto the volume grid (axes flipped/permuted, nearest neighbour)")


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v + 0.0:g}" for v in values) + ")"  # + 0.0: no "-0"


def _reorientation_problem(volume: Header, label: Header, dv: np.ndarray, dl: np.ndarray) -> str | None:
    """Why ``label``'s grid is not a flip/permutation of ``volume``'s voxel grid (None if it is)."""
    relation = dl.T @ dv  # label index axis i vs volume index axis j
    signed_permutation = np.round(relation)
    if not (np.allclose(relation, signed_permutation, atol=DIRECTION_TOLERANCE)
            and (np.abs(signed_permutation).sum(0) == 1).all() and (np.abs(signed_permutation).sum(1) == 1).all()):
        return "the directions are not related by flipping or permuting axes (an oblique rotation)"
    permutation = np.abs(signed_permutation).argmax(0)  # volume axis j is label axis permutation[j]
    if tuple(label.size[p] for p in permutation) != tuple(volume.size):
        return f"its size {label.size} does not match {volume.size} after reordering the axes"
    if not np.allclose([label.spacing[p] for p in permutation], volume.spacing, rtol=0, atol=SPACING_TOLERANCE_MM):
        return f"its spacing {_fmt(label.spacing)} does not match {_fmt(volume.spacing)} after reordering the axes"
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in volume.size], indexing="ij")).reshape(len(volume.size), -1)
    points = np.asarray(volume.origin)[:, None] + dv @ (np.asarray(volume.spacing)[:, None] * corners)
    label_index = np.linalg.solve(dl * np.asarray(label.spacing)[None, :], points - np.asarray(label.origin)[:, None])
    tolerance = ORIGIN_TOLERANCE_MM / min(label.spacing)
    inside = (label_index > -tolerance).all() and (label_index < np.asarray(label.size)[:, None] - 1 + tolerance).all()
    if not (np.allclose(label_index, np.round(label_index), atol=tolerance) and inside):
        shift = np.abs(label_index - np.clip(np.round(label_index), 0, np.asarray(label.size)[:, None] - 1)).max()
        return (f"after reordering the axes its voxels do not coincide with the volume's (a volume corner lies "
                f"{shift:.3g} voxels off the label grid): the direction was changed in the header alone, or the "
                f"origin does not match the flipped axis")
    return None


def label_onto_volume(label: sitk.Image, volume: sitk.Image, fix: GeometryFix) -> sitk.Image:
    """The label (any integer type) as uint8 on the volume's grid according to ``fix``."""
    label = sitk.Cast(label, sitk.sitkUInt8)
    if fix.action == "reorient":
        return sitk.Resample(label, volume, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    result = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(label))
    result.CopyInformation(volume)
    return result


# ---------------------------------------------------------------------------------------------- writing
def image_file(folder: Path, case_id: str, file_ending: str, test: bool = False, channel: int = 0) -> Path:
    """``folder/imagesTr|imagesTs/{case_id}_{channel:04d}{file_ending}``."""
    return folder / ("imagesTs" if test else "imagesTr") / f"{case_id}_{channel:04d}{file_ending}"


def label_file(folder: Path, case_id: str, file_ending: str, test: bool = False) -> Path:
    """``folder/labelsTr/{case_id}{file_ending}`` (``labelsTs`` for test labels kept for evaluation)."""
    return folder / ("labelsTs" if test else "labelsTr") / f"{case_id}{file_ending}"


def _written(path: Path, what: str) -> None:
    """A write failed (writer error, disk full, file size limit): abort, naming the file inside the dataset."""
    raise WriteError(f"writing {path.parent.name}/{path.name} failed: {what}; the conversion was stopped and "
                     f"nothing was published (is the disk full or a file size limit set?)")


def write_nifti(image: sitk.Image, path: Path) -> Path:
    """Write ``image`` as compressed NIfTI and verify it: the file is re-read completely (gzip stream intact,
    as many voxel bytes as its header promises) and its header has the image's size and pixel type."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as error:
        _written(path, _sitk_message(error))
    try:
        check_nifti_complete(path)
    except ConversionError as error:
        _written(path, f"the file on disk is incomplete ({str(error).replace(str(path), 'it')})")
    header = nibabel.load(str(path)).header
    expected = sitk.GetArrayViewFromImage(image)
    if tuple(header.get_data_shape()) != tuple(image.GetSize()) or header.get_data_dtype() != expected.dtype:
        _written(path, f"it reads back as {header.get_data_shape()} {header.get_data_dtype()} instead of "
                       f"{image.GetSize()} {expected.dtype}")
    return path


def write_png(array: np.ndarray, path: Path) -> Path:
    """Write a 2D uint8/uint16 array as PNG and verify it by reading every pixel back."""
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ConversionError(f"{path}: PNG output must be a 2D uint8/uint16 array, got {array.shape} {array.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
    except OSError as error:
        _written(path, str(error))
    try:
        back = read_png(path)
    except ConversionError as error:
        _written(path, f"the file on disk is unreadable ({str(error).replace(str(path), 'it')})")
    if back.shape != array.shape or not np.array_equal(back, array):
        _written(path, "it reads back with other pixel values")
    return path


def write_png_image(array: np.ndarray, folder: Path, case_id: str, test: bool = False, rgb: bool = False,
                    source: Path | str = "") -> list[Path]:
    """Write a 2D image as nnU-Net expects it: one greyscale PNG ``{case_id}_0000.png`` (RGB(A) input is made
    grey with :func:`to_grey`), or with ``rgb`` three greyscale PNGs ``_0000/_0001/_0002`` (R, G, B; nnU-Net
    stacks the ``_XXXX`` files of a case as channels; a grey input is repeated). Use :func:`png_channel_names`
    for the matching ``channel_names``. ``source`` names the input in error messages."""
    if not rgb:
        return [write_png(to_grey(array, source), image_file(folder, case_id, PNG_ENDING, test))]
    channels = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
    return [write_png(np.ascontiguousarray(channels[..., c]), image_file(folder, case_id, PNG_ENDING, test, c))
            for c in range(3)]


def png_channel_names(rgb: bool = False) -> dict[int, str]:
    """``channel_names`` for :func:`write_png_image`'s output (non-CT names: nnU-Net z-scores each channel)."""
    return {0: "R", 1: "G", 2: "B"} if rgb else {0: "grey"}


def write_png_mask(mask: np.ndarray, path: Path, num_classes: int) -> Path:
    """Write a 2D label map as uint8 PNG after checking its values are consecutive class ids 0..num_classes-1."""
    mask = label_values_checked(mask, range(num_classes), path)
    return write_png(mask, path)


@dataclass
class DatasetJson:
    """Arguments of nnU-Net's ``generate_dataset_json`` except the folder and ``num_training_cases`` (counted by
    :func:`write_dataset`); ``extra`` goes into dataset.json as additional keys."""

    channel_names: dict
    labels: dict
    file_ending: str
    dataset_name: str
    reference: str | None = None
    description: str | None = None
    license: str = "see the dataset's terms of use"
    converted_by: str = "nnunet_ext.dataset_conversion"
    extra: dict = field(default_factory=dict)


def write_dataset_json(folder: Path, spec: DatasetJson, num_training: int) -> Path:
    """``dataset.json`` via nnU-Net's ``generate_dataset_json``, verified by reading it back."""
    try:
        generate_dataset_json(str(folder), channel_names=dict(spec.channel_names), labels=dict(spec.labels),
                              num_training_cases=num_training, file_ending=spec.file_ending,
                              dataset_name=spec.dataset_name, reference=spec.reference,
                              description=spec.description, license=spec.license,
                              converted_by=spec.converted_by, **spec.extra)
        written = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError) as error:
        _written(folder / "dataset.json", str(error))
    if written.get("numTraining") != num_training or written.get("file_ending") != spec.file_ending:
        _written(folder / "dataset.json", "it reads back with other content")
    return folder / "dataset.json"


def write_splits(folder: Path, splits: Sequence[dict], training_ids: Iterable[str]) -> Path:
    """``splits_final.json`` in the raw dataset folder (nnU-Net's planner copies it to nnUNet_preprocessed and
    then trains with it). ``splits`` is a list of ``{"train": [...], "val": [...]}``; every id must be a training
    case, and train and val of a fold must not overlap."""
    known = set(training_ids)
    problems = Problems()
    for k, fold in enumerate(splits):
        if set(fold) != {"train", "val"}:
            problems.add(None, f"split {k} must have exactly the keys 'train' and 'val', got {sorted(fold)}")
            continue
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known, key=natural_key)
        if unknown:
            problems.add(None, f"split {k} names cases that are not training cases: {unknown[:10]}")
        overlap = sorted(set(fold["train"]) & set(fold["val"]), key=natural_key)
        if overlap:
            problems.add(None, f"split {k} has cases in both train and val: {overlap[:10]}")
    problems.raise_if_any()
    content = [{"train": list(f["train"]), "val": list(f["val"])} for f in splits]
    path = folder / "splits_final.json"
    try:
        save_json(content, str(path), sort_keys=False)
        ok = json.loads(path.read_text()) == content
    except (OSError, ValueError) as error:
        _written(path, str(error))
    if not ok:
        _written(path, "it reads back with other content")
    return path


# ---------------------------------------------------------------------------------------- target folder
def dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    """``Dataset{id:03d}_{name}`` after checking the id (1-999) and the name (letters, digits, ``_``, ``-``)."""
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", dataset_name):
        raise ConversionError(f"dataset name {dataset_name!r} must be letters, digits, '_' or '-'")
    return f"Dataset{dataset_id:03d}_{dataset_name}"


def nnunet_folders(output_folder: Path) -> list[Path]:
    """The output folder and the nnUNet_raw/_preprocessed/_results folders that are set, without repeats."""
    folders = [output_folder] + [Path(os.environ[v]) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
                                 if os.environ.get(v)]
    unique: dict[Path, Path] = {}
    for folder in folders:
        unique.setdefault(folder.resolve(), folder)
    return [f for f in unique.values() if f.is_dir()]


def check_target(output_folder: Path | str, dataset_id: int, dataset_name: str, overwrite: bool,
                 dry_run: bool = False) -> Path:
    """The dataset folder ``output_folder/Dataset{id:03d}_{name}`` after the refusal rules.

    Refused (all problems reported together): an output path that is a file; another dataset with the same id
    (``Dataset003_Other``) or the same name under another id in the output folder, ``$nnUNet_raw``,
    ``$nnUNet_preprocessed`` or ``$nnUNet_results`` (nnU-Net could not tell them apart); an existing target
    without ``overwrite``; a conversion to the same target still running. Temporary folders left by a killed
    earlier run (:func:`clean_stale_folders`) are cleaned first (with ``dry_run`` only named).
    """
    output_folder = Path(output_folder)
    name = dataset_folder_name(dataset_id, dataset_name)
    target = output_folder / name
    if output_folder.exists() and not output_folder.is_dir():
        raise ConversionError(f"output folder {output_folder} is not a folder")
    if output_folder.is_dir():
        clean_stale_folders(output_folder, target, dry_run)
    problems = Problems()
    for folder in nnunet_folders(output_folder):
        for other in sorted(folder.glob("Dataset[0-9][0-9][0-9]_*"), key=natural_key):
            same_id, same_name = other.name[7:10] == f"{dataset_id:03d}", other.name[11:] == dataset_name
            if other.name == name or not other.is_dir():
                continue
            if same_id:
                problems.add(other, f"{other} already uses dataset id {dataset_id}; nnU-Net could not tell it from "
                                    f"{name}: remove it or choose another id")
            elif same_name:
                problems.add(other, f"{other} already uses dataset name {dataset_name}; nnU-Net could not tell it "
                                    f"from {name}: remove it or choose another name (-n)")
    if target.exists() and not overwrite:
        problems.add(target, f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
    problems.raise_if_any()
    return target


def _alive(host: str, pid: int) -> bool | None:
    """Whether process ``pid`` on ``host`` runs (None: another host, cannot tell)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_folders(output_folder: Path, target: Path, dry_run: bool = False) -> None:
    """Deal with the hidden temporary folders ``.DatasetXXX_Name.partial-*``/``.old-*`` left in ``output_folder``
    by runs killed with SIGKILL (issue 14 item 5). One of a dead process on this host is cleaned, whatever dataset
    it was for: a ``.partial-*`` folder is removed; an ``.old-*`` folder (a previous dataset moved aside while being
    replaced) is removed when its dataset exists, else renamed back to it; each action is printed (with ``dry_run``
    only announced). For ``target`` itself, a folder of a process still running refuses the run, and one made on
    another host (cannot tell whether it still runs) is named with the command that removes it; such folders of
    other datasets are left alone."""
    for folder in sorted(output_folder.iterdir()):
        match = _PARTIAL.fullmatch(folder.name)
        if match is None:
            continue
        owner, kind, host, pid = output_folder / match.group(1), match.group(2), match.group(3), int(match.group(4))
        alive = _alive(host, pid)
        if alive is not False and owner.name != target.name:
            continue
        if alive:
            raise ConversionError(f"{folder} belongs to a conversion to {target.name} still running (process {pid}); "
                                  f"wait for it to finish or stop it")
        if alive is None:
            raise ConversionError(f"{folder} was left by a conversion on host {host}; if that run is over, remove it "
                                  f"with: rm -rf '{folder}'")
        if kind == "old" and not owner.exists():
            if not dry_run:
                folder.rename(owner)
            print(f"{'Would restore' if dry_run else 'Restored'} {owner} from {folder.name}, left by an interrupted "
                  f"--overwrite run (process {pid})", file=sys.stderr, flush=True)
            continue
        if not dry_run:
            shutil.rmtree(folder)
        print(f"{'Would remove' if dry_run else 'Removed'} {folder}, left by an interrupted conversion "
              f"(process {pid})", file=sys.stderr, flush=True)


def _temporary_sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP while folders are renamed or removed, so a signal cannot cut them in half."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def atomic_dataset(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``target`` to write into; on success rename it to ``target``
    (an existing target only with ``overwrite``: it is moved aside first and removed last, and restored if the
    rename fails). On any exception, SIGINT, SIGTERM or SIGHUP (see :func:`handle_signals`) the temporary
    folder is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _temporary_sibling(target, "partial")
    partial.mkdir()
    try:
        yield partial
        with signals_blocked():
            raise_if_interrupted()  # a signal whose exception was swallowed before: nothing is published
            if target.exists():
                if not overwrite:
                    raise ConversionError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
                old = _temporary_sibling(target, "old")
                target.rename(old)
                try:
                    partial.rename(target)
                except BaseException:
                    old.rename(target)
                    raise
                shutil.rmtree(old)
            else:
                partial.rename(target)
    finally:
        if partial.exists():
            with signals_blocked():
                shutil.rmtree(partial, ignore_errors=True)


# ------------------------------------------------------------------------------------------- converting
def _ignore_sigint() -> None:
    """Pool workers leave SIGINT to the main process, which cleans up and terminates them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_case(function: Callable[[Any, Path | None], str], folder: Path | None, case: Any) -> tuple[bool, str]:
    """Convert one case; an input problem comes back as ``(False, message)``, a write failure raises."""
    try:
        return True, function(case, folder)
    except WriteError as error:
        raise WriteError(f"case {case.case_id}: {error}") from None
    except ConversionError as error:
        return False, str(error)


def run_cases(function: Callable[[Any, Path | None], str], cases: Sequence[Any], folder: Path | None,
              num_processes: int = 1) -> Iterator[tuple[bool, str]]:
    """``function(case, folder)`` for every case in order, in-process or in a spawn pool of ``num_processes``."""
    work = functools.partial(_run_case, function, folder)
    if num_processes == 1 or len(cases) <= 1:
        yield from map(work, cases)
        return
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(cases)), initializer=_ignore_sigint) as pool:
        yield from pool.imap(work, cases)


def convert_cases(function: Callable[[Any, Path | None], str], cases: Sequence[Any], folder: Path | None,
                  num_processes: int = 1, problems: Problems | None = None) -> None:
    """Run every case, print ``[k/N] note`` per case on stdout (a tqdm bar on stderr when it is a terminal),
    collect the input problems of all cases (after those already in ``problems``) and raise them together at
    the end; a write failure aborts."""
    problems = problems if problems is not None else Problems()
    with tqdm(total=len(cases), unit="case", disable=None, file=sys.stderr, leave=False) as bar:
        for k, (ok, note) in enumerate(run_cases(function, cases, folder, num_processes), start=1):
            raise_if_interrupted()
            if ok:
                bar.write(f"[{k}/{len(cases)}] {note}", file=sys.stdout)
            else:
                problems.add(None, note)
            bar.update()
    sys.stdout.flush()
    problems.raise_if_any()


def write_dataset(target: Path, cases: Sequence[Any], convert_case: Callable[[Any, Path | None], str],
                  dataset_json: DatasetJson, splits: Sequence[dict] | None = None, overwrite: bool = False,
                  dry_run: bool = False, num_processes: int = 1, problems: Problems | None = None) -> Path:
    """Convert ``cases`` (objects with ``.case_id`` and ``.test``) into ``target`` atomically and return it.

    ``convert_case(case, folder)`` reads and checks one case completely and writes its files into ``folder``
    with the writers above; with ``folder=None`` (``dry_run``) it only checks. It is called in worker processes
    when ``num_processes > 1`` (so it must be a module-level function). Input problems of all cases are
    reported together and nothing is published; then ``dataset.json`` and, if given, ``splits_final.json``
    are written and the folder is renamed into place. A dry run prints what would be written instead.

    ``problems`` (optional) holds what the converter's own validation found (pairing, headers): if it is not
    empty, the remaining ``cases`` are only checked and everything is reported together, so that one run names
    every bad file.
    """
    if num_processes < 1:
        raise ConversionError(f"the number of processes must be at least 1, got {num_processes}")
    if problems is not None and len(problems):
        convert_cases(convert_case, cases, None, num_processes, problems)  # adds the cases' problems and raises
    if not cases:
        raise ConversionError("no cases to convert")
    training = [c.case_id for c in cases if not c.test]
    duplicates = sorted((i for i, n in Counter(c.case_id for c in cases).items() if n > 1), key=natural_key)
    if duplicates:
        raise ConversionError(f"case ids used twice: {duplicates[:10]}")
    if dry_run:
        convert_cases(convert_case, cases, None, num_processes)
        extra = " and splits_final.json" if splits is not None else ""
        print(f"Dry run: all {len(cases)} cases are valid; would write {len(training)} training and "
              f"{len(cases) - len(training)} test cases, dataset.json{extra} to {target}"
              f"{' (replacing it)' if target.exists() else ''}; nothing was written", flush=True)
        return target
    with atomic_dataset(target, overwrite) as partial:
        for sub in ("imagesTr", "labelsTr"):
            (partial / sub).mkdir()
        if len(training) < len(cases):
            (partial / "imagesTs").mkdir()
        convert_cases(convert_case, cases, partial, num_processes)
        write_dataset_json(partial, dataset_json, len(training))
        if splits is not None:
            write_splits(partial, splits, training)
    print(f"Converted {len(training)} training and {len(cases) - len(training)} test cases to {target}", flush=True)
    return target


# ------------------------------------------------------------------------------------------ command line
def converter_parser(prog: str, description: str, default_name: str,
                     input_help: str = "the folder of the dataset's release") -> argparse.ArgumentParser:
    """The common command line: ``INPUT -d ID [-n NAME] [-o OUTPUT] [--overwrite] [--dry-run] [-np N]``;
    converters add their own options to the returned parser. Parse it with :func:`run_converter_cli`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("input_root", type=Path, help=input_help)
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    parser.add_argument("-n", dest="dataset_name", default=default_name, help=f"dataset name (default {default_name})")
    parser.add_argument("-o", dest="output_folder", type=Path, default=None,
                        help="output folder (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("--dry-run", action="store_true",
                        help="only read and check every input and print what would be written")
    parser.add_argument("-np", dest="num_processes", type=int, default=1, help="worker processes (default 1)")
    return parser


def add_nan_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--nan-to VALUE`` (``args.nan_to``, default None) for converters of float images: pass it to
    :func:`read_image` to replace NaN/inf voxels instead of refusing them."""
    parser.add_argument("--nan-to", type=float, default=None,
                        help="replace NaN/inf voxels of the images by this value (default: refuse them)")
    return parser


def parse_converter_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; ``output_folder`` defaults to ``$nnUNet_raw`` (neither: a usage error, exit 2)."""
    args = parser.parse_args(argv)
    if args.output_folder is None:
        if not os.environ.get("nnUNet_raw"):
            parser.error("no output folder: pass -o OUTPUT_FOLDER or set the nnUNet_raw environment variable")
        args.output_folder = Path(os.environ["nnUNet_raw"])
    return args


_received_signals: list[int] = []


def _raise_interrupted(signum: int, frame: object) -> None:
    # remembered as well: Python swallows an exception raised while a ``__del__`` runs (e.g. nibabel's, during
    # garbage collection), so ``raise_if_interrupted`` raises it again at the next check point
    _received_signals.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` if a handled signal arrived, even if its exception was swallowed."""
    if _received_signals:
        raise Interrupted(_received_signals[0])


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted` in the main thread while converting.

    An :class:`Interrupted` that Python swallows inside a ``__del__`` is not printed as "Exception ignored"
    with a traceback: it is remembered and raised again by :func:`raise_if_interrupted`. Every other
    unraisable exception still goes to the previous ``sys.unraisablehook``."""
    previous_hook = sys.unraisablehook

    def hide_swallowed_interruption(unraisable: object) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            previous_hook(unraisable)

    _received_signals.clear()
    previous = {s: signal.signal(s, _raise_interrupted) for s in HANDLED_SIGNALS}
    sys.unraisablehook = hide_swallowed_interruption
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = previous_hook
        _received_signals.clear()


def _print_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: object = None, line: str | None = None) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def run_converter_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                      convert: Callable[[argparse.Namespace], object]) -> None:
    """Parse ``argv`` and run ``convert(args)`` as a console command: every :class:`ConversionWarning` is one
    ``WARNING: ...`` line on stderr; bad input is ``error: ...`` on stderr and exit 1 (no traceback); SIGINT,
    SIGTERM and SIGHUP clean up, print one line and exit with ``128 + signal number``."""
    args = parse_converter_args(parser, argv)
    with warnings.catch_warnings(), handle_signals():
        warnings.simplefilter("always", ConversionWarning)
        warnings.showwarning = _print_warning
        try:
            convert(args)
        except Interrupted as interruption:
            print(f"error: interrupted by {interruption.name}; nothing was published (temporary files removed)",
                  file=sys.stderr, flush=True)
            sys.exit(128 + interruption.signum)
        except (ConversionError, OSError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)
