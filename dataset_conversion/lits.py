"""Convert LiTS (Liver Tumor Segmentation Challenge, Bilic et al. 2023) to an nnU-Net v2 raw dataset.

Real layout (CodaLab release, uncompressed NIfTI, numbers not zero padded)::

    Training Batch 1/volume-0..27.nii,   segmentation-0..27.nii
    Training Batch 2/volume-28..130.nii, segmentation-28..130.nii
    <test folder, e.g. LITS-Challenge-Test-Data>/test-volume-0..69.nii

Volumes are int16 HU CT, labels 0 background, 1 liver, 2 tumour (13 of 131 cases have no tumour).

Files are discovered recursively under the input root (any folder, ``.nii`` or ``.nii.gz``;
hidden files and folders such as AppleDouble ``._volume-0.nii`` and ``__MACOSX`` are skipped)
by the exact names ``volume-N``, ``segmentation-N`` and ``test-volume-N``. Volume and
segmentation are paired by the number N, never by sorted order. Case ids are zero padded to three
digits: ``volume-5.nii`` becomes ``lits_005`` and ``test-volume-5.nii`` becomes
``lits_test_005``. Output, in ``<output>/Dataset{id:03d}_{name}/``::

    imagesTr/lits_005_0000.nii.gz   labelsTr/lits_005.nii.gz   imagesTs/lits_test_005_0000.nii.gz
    dataset.json   (channel 0 "CT"; labels background 0, liver 1, tumor 2)

Quirks handled:

* Volumes 28-47 carry identity affines (spacing 1, origin 0, identity direction) in both the
  volume and the segmentation: consistent, converted as they are.
* ``segmentation-53`` carries an identity geometry while ``volume-53`` does not: when the sizes
  match, the volume geometry is copied onto the label and a :class:`LiTSGeometryWarning` names
  the case. Any other origin/direction difference is fixed the same way (with a warning, as
  nnU-Net only warns about it); a spacing difference beyond 1e-3 mm is an error.
* Labels are written as uint8; values outside {0, 1, 2} are an error.

Everything is checked before anything is written (pairing, duplicates, readable headers, equal
sizes, spacing), except the label values, which are checked while converting. The dataset is
built in a hidden temporary sibling folder and renamed into place only when complete, so a
failed run leaves no partial dataset and an existing one untouched.

Alternative route: the Medical Segmentation Decathlon ``Task03_Liver`` is a copy of the LiTS
training set (``imagesTr/liver_0..130.nii.gz``, labels 0 background, 1 liver, 2 cancer). nnU-Net
converts it itself::

    nnUNetv2_convert_MSD_dataset -i /path/to/Task03_Liver -overwrite_id 3 -np 4

``-i`` is the extracted folder (its name must stay ``Task03_Liver``: the dataset name is read from
it), ``-overwrite_id`` the target id (default: the task number, 3) and ``-np`` the number of
processes. It writes ``$nnUNet_raw/Dataset003_Liver``, skips ``._*``/``_*`` files, and refuses an
id already used in nnUNet_raw, nnUNet_preprocessed or nnUNet_results.

Command line::

    nnunet_ext_convert_lits INPUT_ROOT -d 3 [-n LiTS] [-o OUTPUT_FOLDER] [--overwrite] [-np 4]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from nnunetv2.paths import nnUNet_raw

LABELS = {"background": 0, "liver": 1, "tumor": 2}
ALLOWED_LABEL_VALUES = sorted(LABELS.values())
FILE_ENDING = ".nii.gz"
_NIFTI = r"\.nii(?:\.gz)?"
VOLUME_PATTERN = re.compile(rf"volume-(\d+){_NIFTI}")
SEGMENTATION_PATTERN = re.compile(rf"segmentation-(\d+){_NIFTI}")
TEST_VOLUME_PATTERN = re.compile(rf"test-volume-(\d+){_NIFTI}")
SPACING_TOLERANCE_MM = 1e-3
ORIGIN_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
REFERENCE = ("Bilic et al., The Liver Tumor Segmentation Benchmark (LiTS), Medical Image Analysis 84 "
             "(2023) 102680; https://competitions.codalab.org/competitions/17094")


class LiTSConversionError(ValueError):
    """An input or output problem that stops the conversion; the message names the file."""


class LiTSGeometryWarning(UserWarning):
    """A label's geometry was replaced by its volume's geometry."""


@dataclass(frozen=True)
class Header:
    """Size and geometry of one image file, as SimpleITK reads them (x, y, z order)."""

    path: Path
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def is_identity(self) -> bool:
        """True for the LiTS identity affine: spacing 1, origin 0, identity direction."""
        return (np.allclose(self.spacing, 1.0, rtol=0, atol=SPACING_TOLERANCE_MM)
                and np.allclose(self.origin, 0.0, rtol=0, atol=ORIGIN_TOLERANCE_MM)
                and np.allclose(self.direction, IDENTITY_DIRECTION, rtol=0, atol=DIRECTION_TOLERANCE))


@dataclass(frozen=True)
class TrainingCase:
    """A LiTS training case: ``volume-N`` and ``segmentation-N``."""

    number: int
    volume: Path
    segmentation: Path

    @property
    def case_id(self) -> str:
        """nnU-Net case id, e.g. ``lits_005``."""
        return f"lits_{self.number:03d}"


@dataclass(frozen=True)
class ChallengeTestCase:
    """A LiTS test case: ``test-volume-N`` without a label."""

    number: int
    volume: Path

    @property
    def case_id(self) -> str:
        """nnU-Net case id, e.g. ``lits_test_005``."""
        return f"lits_test_{self.number:03d}"


@dataclass(frozen=True)
class ConversionJob:
    """One case to convert; ``segmentation``/``label_out`` are None for test cases."""

    case_id: str
    volume: Path
    image_out: Path
    segmentation: Path | None = None
    label_out: Path | None = None


def is_hidden(name: str) -> bool:
    """Hidden folders and the ``__MACOSX`` folders of macOS archives."""
    return name.startswith(".") or name == "__MACOSX"


def find_lits_files(input_root: Path, pattern: re.Pattern) -> dict[int, Path]:
    """Map case number -> file for every file under ``input_root`` named exactly by ``pattern``.

    Hidden folders and ``__MACOSX`` are not entered; AppleDouble ``._*`` files never match.
    Raises :class:`LiTSConversionError` when two files carry the same number.
    """
    found: dict[int, Path] = {}
    for folder, subfolders, files in os.walk(input_root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not is_hidden(d))
        for name in sorted(files):
            match = pattern.fullmatch(name)
            if match is None:
                continue
            number, path = int(match.group(1)), Path(folder) / name
            if number in found:
                raise LiTSConversionError(f"duplicate case number {number}: {found[number]} and {path}")
            found[number] = path
    return found


def pair_training_cases(volumes: dict[int, Path], segmentations: dict[int, Path]) -> list[TrainingCase]:
    """Pair ``volume-N`` with ``segmentation-N`` by N; every file must have its partner."""
    problems = [f"{volumes[n]} has no segmentation-{n}.nii(.gz)" for n in sorted(volumes.keys() - segmentations)]
    problems += [f"{segmentations[n]} has no volume-{n}.nii(.gz)" for n in sorted(segmentations.keys() - volumes)]
    if problems:
        raise LiTSConversionError("; ".join(problems))
    return [TrainingCase(n, volumes[n], segmentations[n]) for n in sorted(volumes)]


def discover_cases(input_root: Path) -> tuple[list[TrainingCase], list[ChallengeTestCase]]:
    """Find and pair all training cases and test volumes under ``input_root``."""
    if not input_root.is_dir():
        raise LiTSConversionError(f"input folder {input_root} does not exist")
    volumes = find_lits_files(input_root, VOLUME_PATTERN)
    if not volumes:
        raise LiTSConversionError(f"no LiTS training volumes (volume-N.nii) found under {input_root}")
    training = pair_training_cases(volumes, find_lits_files(input_root, SEGMENTATION_PATTERN))
    tests = find_lits_files(input_root, TEST_VOLUME_PATTERN)
    return training, [ChallengeTestCase(n, tests[n]) for n in sorted(tests)]


def reader_message(error: RuntimeError) -> str:
    """The last, informative line of a SimpleITK exception, without its ``sitk::ERROR:`` prefix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1].removeprefix("sitk::ERROR:").strip() if lines else repr(error)


def read_header(path: Path) -> Header:
    """Read size and geometry of ``path`` without its voxels; it must be a scalar 3D image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise LiTSConversionError(f"cannot read {path}: {reader_message(error)}") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise LiTSConversionError(f"{path} is not a single-channel 3D image (dimension "
                                  f"{reader.GetDimension()}, {reader.GetNumberOfComponents()} components)")
    return Header(path, reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def read_image(path: Path) -> sitk.Image:
    """Read a whole image; unreadable voxel data raises :class:`LiTSConversionError`."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise LiTSConversionError(f"cannot read {path}: {reader_message(error)}") from None


def geometry_warning(case: TrainingCase, volume: Header, label: Header) -> str | None:
    """Check that ``label`` fits ``volume``; return a warning if its geometry must be replaced.

    Sizes must be equal and spacings equal within tolerance, except for the LiTS quirk of an
    identity-geometry label on a non-identity volume, which is fixed like an origin/direction
    mismatch: the label gets the volume geometry.
    """
    if volume.size != label.size:
        raise LiTSConversionError(f"size mismatch: {volume.path} is {volume.size} but "
                                  f"{label.path} is {label.size} (x, y, z)")
    if label.is_identity() and not volume.is_identity():
        return (f"{case.case_id}: {label.path} has an identity geometry (spacing 1, origin 0, identity "
                f"direction) but {volume.path.name} does not; copying the volume geometry onto the label")
    if not np.allclose(volume.spacing, label.spacing, rtol=0, atol=SPACING_TOLERANCE_MM):
        raise LiTSConversionError(f"spacing mismatch: {volume.path} has {volume.spacing} but "
                                  f"{label.path} has {label.spacing}")
    if not (np.allclose(volume.origin, label.origin, rtol=0, atol=ORIGIN_TOLERANCE_MM)
            and np.allclose(volume.direction, label.direction, rtol=0, atol=DIRECTION_TOLERANCE)):
        return (f"{case.case_id}: origin/direction of {label.path} differ from {volume.path.name}; "
                f"copying the volume geometry onto the label")
    return None


def validate_inputs(training: list[TrainingCase], tests: list[ChallengeTestCase]) -> list[str]:
    """Read every header and check every training pair; return the geometry warnings to emit."""
    messages = []
    for case in training:
        message = geometry_warning(case, read_header(case.volume), read_header(case.segmentation))
        if message is not None:
            messages.append(message)
    for test in tests:
        read_header(test.volume)
    return messages


def dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    """``Dataset{id:03d}_{name}`` after checking id and name."""
    if not 1 <= dataset_id <= 999:
        raise LiTSConversionError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", dataset_name):
        raise LiTSConversionError(f"dataset name {dataset_name!r} must be letters, digits, '_' or '-'")
    return f"Dataset{dataset_id:03d}_{dataset_name}"


def check_target(output_folder: Path, dataset_id: int, target: Path, overwrite: bool) -> None:
    """Refuse an existing target (unless ``overwrite``) and any other dataset with the same id."""
    if output_folder.exists() and not output_folder.is_dir():
        raise LiTSConversionError(f"output folder {output_folder} is not a folder")
    if not output_folder.is_dir():
        return
    others = sorted(p for p in output_folder.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p != target)
    if others:
        raise LiTSConversionError(f"{others[0]} already uses dataset id {dataset_id}; nnU-Net could not tell "
                                  f"it from {target.name}: remove it or choose another id")
    if target.exists() and not overwrite:
        raise LiTSConversionError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")


def conversion_jobs(folder: Path, training: list[TrainingCase], tests: list[ChallengeTestCase]) -> list[ConversionJob]:
    """One job per case, writing into the dataset ``folder``."""
    jobs = [ConversionJob(case.case_id, case.volume, folder / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}",
                          case.segmentation, folder / "labelsTr" / f"{case.case_id}{FILE_ENDING}")
            for case in training]
    jobs += [ConversionJob(test.case_id, test.volume, folder / "imagesTs" / f"{test.case_id}_0000{FILE_ENDING}")
             for test in tests]
    return jobs


def label_on_volume_grid(segmentation: sitk.Image, volume: sitk.Image, path: Path) -> sitk.Image:
    """The label as uint8 with the volume's geometry; values outside {0, 1, 2} are an error."""
    values = sitk.GetArrayViewFromImage(segmentation)
    unexpected = np.unique(values[~np.isin(values, ALLOWED_LABEL_VALUES)])
    if unexpected.size:
        raise LiTSConversionError(f"{path} has label values {unexpected.tolist()} outside "
                                  f"{ALLOWED_LABEL_VALUES} (background, liver, tumor)")
    label = sitk.GetImageFromArray(values.astype(np.uint8))
    label.CopyInformation(volume)
    return label


def convert_case(job: ConversionJob) -> str:
    """Convert one case (in a worker process when ``num_processes > 1``); return a progress note."""
    volume = read_image(job.volume)
    sitk.WriteImage(volume, str(job.image_out), useCompression=True)
    if job.segmentation is not None:
        label = label_on_volume_grid(read_image(job.segmentation), volume, job.segmentation)
        sitk.WriteImage(label, str(job.label_out), useCompression=True)
    return f"{job.volume.name} -> {job.case_id}"


def run_jobs(jobs: list[ConversionJob], num_processes: int) -> Iterator[str]:
    """Convert ``jobs`` in order, in-process or in a spawn pool; yield their progress notes."""
    if num_processes == 1:
        yield from map(convert_case, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        yield from pool.imap(convert_case, jobs)


def write_dataset(folder: Path, training: list[TrainingCase], tests: list[ChallengeTestCase],
                  dataset_name: str, num_processes: int) -> None:
    """Write images, labels and ``dataset.json`` into the (empty) ``folder``."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir()
    jobs = conversion_jobs(folder, training, tests)
    for k, note in enumerate(run_jobs(jobs, num_processes), start=1):
        print(f"[{k}/{len(jobs)}] {note}", flush=True)
    generate_dataset_json(
        str(folder), channel_names={0: "CT"}, labels=dict(LABELS), num_training_cases=len(training),
        file_ending=FILE_ENDING, dataset_name=dataset_name, reference=REFERENCE,
        description="LiTS: contrast-enhanced abdominal CT with liver and liver tumour labels",
        license="see the LiTS challenge terms of use (CodaLab competition 17094)",
        converted_by="nnunet_ext.dataset_conversion.lits")


def publish(partial: Path, target: Path) -> None:
    """Rename the complete ``partial`` folder to ``target``, replacing an existing one last."""
    if not target.exists():
        partial.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    try:
        partial.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old)


def convert_lits(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "LiTS",
                 overwrite: bool = False, num_processes: int = 1) -> Path:
    """Convert the LiTS release under ``input_root`` to ``output_folder/Dataset{id:03d}_{name}``.

    Everything that can be checked from headers is checked before writing; the dataset is built
    in a hidden temporary sibling folder and renamed into place when complete. Emits a
    :class:`LiTSGeometryWarning` per label whose geometry is replaced. Raises
    :class:`LiTSConversionError` naming the offending file. Returns the dataset folder.
    """
    if num_processes < 1:
        raise LiTSConversionError(f"num_processes must be at least 1, got {num_processes}")
    output_folder = Path(output_folder)
    target = output_folder / dataset_folder_name(dataset_id, dataset_name)
    check_target(output_folder, dataset_id, target, overwrite)
    training, tests = discover_cases(Path(input_root))
    for message in validate_inputs(training, tests):
        warnings.warn(message, LiTSGeometryWarning, stacklevel=2)

    output_folder.mkdir(parents=True, exist_ok=True)
    partial = output_folder / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        write_dataset(partial, training, tests, dataset_name, num_processes)
        publish(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"Converted {len(training)} training and {len(tests)} test cases to {target}", flush=True)
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of ``nnunet_ext_convert_lits``; the output defaults to $nnUNet_raw."""
    parser = argparse.ArgumentParser(prog="nnunet_ext_convert_lits",
                                     description="Convert LiTS to an nnU-Net v2 raw dataset.")
    parser.add_argument("input_root", type=Path, help="folder holding 'Training Batch 1/2' and the test volumes")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id, e.g. 3")
    parser.add_argument("-n", dest="dataset_name", default="LiTS", help="dataset name (default LiTS)")
    parser.add_argument("-o", dest="output_folder", type=Path, default=None,
                        help="output folder (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("-np", dest="num_processes", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    if args.output_folder is None:
        if not nnUNet_raw.is_set():
            parser.error("no output folder: pass -o OUTPUT_FOLDER or set the nnUNet_raw environment variable")
        args.output_folder = Path(nnUNet_raw.get())
    return args


def print_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """``warnings.showwarning`` replacement for the command line: one ``WARNING:`` line on stderr."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_lits``; exits 1 with ``error: ...`` on bad input."""
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", LiTSGeometryWarning)
        warnings.showwarning = print_warning
        try:
            convert_lits(args.input_root, args.dataset_id, args.output_folder, args.dataset_name,
                         args.overwrite, args.num_processes)
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
