"""Convert ACDC (Automated Cardiac Diagnosis Challenge, Bernard et al., IEEE TMI 2018) with nnU-Net's own
``Dataset027_ACDC`` conversion, behind our command conventions.

Real layout (the ``database`` folder of the release)::

    database/training/patient001/Info.cfg              ED: 1 / ES: 12 / Group: DCM / Height / NbFrame / Weight
                                 patient001_4d.nii.gz   (cine, x y z t)
                                 patient001_frame01.nii.gz  patient001_frame01_gt.nii.gz   (ED)
                                 patient001_frame12.nii.gz  patient001_frame12_gt.nii.gz   (ES)
    database/training/patient002 .. patient100
    database/testing/patient101 .. patient150           (same files; ``_gt`` files where the release has them)

Labels: 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity (nnU-Net's names: RV, MLV, LVC).

The conversion itself is nnU-Net's (``nnunetv2.dataset_conversion.Dataset027_ACDC``, not rewritten):
``copy_files`` copies every ED/ES frame as a case (``patient001_frame01``: image
``imagesTr/patient001_frame01_0000.nii.gz``, label ``labelsTr/patient001_frame01.nii.gz``; testing frames
to ``imagesTs``), ``create_ACDC_split`` makes its patient-wise 5-fold split (both frames of a patient in
the same fold, seed 1234), and ``dataset.json`` has its channel ``cineMRI`` and labels. Written into our
atomic temporary folder instead of ``$nnUNet_raw`` directly, because nnU-Net's ``convert_acdc`` /
``make_out_dirs`` write there (and fail in nnunetv2 2.8.1: ``nnUNet_raw.replace`` on its new path
object); its split goes to the dataset's own ``splits_final.json``, which ``nnUNetv2_plan_and_preprocess``
copies to nnUNet_preprocessed, instead of being written into nnUNet_preprocessed by the script.

What we add (nnU-Net's script copies whatever it finds): validation first, every problem naming the
file, nothing written on any problem:

* ``training`` and ``testing`` folders (nnU-Net's copy reads both), every sub-folder a ``patientNNN``
  folder (it would copy the ``.gz`` files of any folder), at least 5 training patients (its split has 5 folds);
* ``Info.cfg`` present and readable, with integer ``ED``, ``ES`` and ``NbFrame``, ``1 <= ED, ES <= NbFrame``,
  ``ED != ES``;
* the ED and ES frame images present, each training frame with its ``_gt`` label and no label without its
  frame image; no other ``.gz`` file in a patient folder (nnU-Net would copy it as a case), e.g. a macOS
  ``._patient001_frame01.nii.gz``; uncompressed ``.nii`` frames are named (nnU-Net reads only ``.nii.gz``);
* every image and label read completely (truncated gzip, broken header, NaN voxels), labels the same size,
  spacing and orientation as their frame (nnU-Net copies files as they are, so nothing can be fixed),
  label values integers in {0, 1, 2, 3}; the ``_4d`` cine is not converted and not read;
* after the copy, the written files are exactly the ones expected and re-read completely.

Also added: ``_gt`` files of the testing patients (``--test-labels``, default on when present) are kept as
``labelsTs/patientNNN_frameYY.nii.gz`` for ``nnUNetv2_evaluate_folder``.

Command line::

    nnunet_ext_convert_acdc database -d 542 [-n ACDC] [--no-test-labels] [-o OUTPUT] [--overwrite]
                            [--dry-run] [-np N]

``-np`` sets the processes of the checks (reading every file); nnU-Net's copy is sequential.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from nnunetv2.dataset_conversion import Dataset027_ACDC as nnunet_acdc

from nnunet_ext.dataset_conversion import common

DATABASE, TRAINING, TESTING = "database", "training", "testing"
INFO_FILE = "Info.cfg"
INFO_KEYS = ("ED", "ES", "NbFrame")
ACDC_LABELS = {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}
CHANNEL_NAMES = {0: "cineMRI"}
MIN_TRAINING_PATIENTS = 5
PATIENT_FOLDER = re.compile(r"patient\d{3}")
REFERENCE = ("Bernard et al., Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures Segmentation and "
             "Diagnosis: Is the Problem Solved?, IEEE TMI 37(11) 2018; https://www.creatis.insa-lyon.fr/Challenge/acdc/")


def patient_name(number: int) -> str:
    """``patient001``."""
    return f"patient{number:03d}"


def frame_name(patient: str, frame: int, gt: bool = False) -> str:
    """``patient001_frame01.nii.gz`` or ``patient001_frame01_gt.nii.gz``."""
    return f"{patient}_frame{frame:02d}{'_gt' if gt else ''}.nii.gz"


def cine_name(patient: str) -> str:
    """``patient001_4d.nii.gz``."""
    return f"{patient}_4d.nii.gz"


@dataclass(frozen=True)
class ACDCFrame:
    """One ED or ES frame: nnU-Net's case ``patient001_frame01`` (``test``: from the testing folder)."""

    image: Path
    label: Path | None
    test: bool

    @property
    def case_id(self) -> str:
        return self.image.name.removesuffix(".nii.gz")


def read_info(path: Path) -> dict[str, int]:
    """``ED``, ``ES`` and ``NbFrame`` of an ``Info.cfg`` (``Key: value`` lines), checked for consistency."""
    if not path.is_file():
        raise common.ConversionError(f"{path} is missing (it names the ED and ES frames)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise common.ConversionError(f"cannot read {path}: {error}") from None
    entries = dict(line.split(":", 1) for line in lines if ":" in line)
    entries = {key.strip(): value.strip() for key, value in entries.items()}
    missing = [key for key in INFO_KEYS if key not in entries]
    if missing:
        raise common.ConversionError(f"{path} has no {', '.join(missing)} line (expected 'ED: 1', 'ES: 12', "
                                     f"'NbFrame: 30')")
    try:
        info = {key: int(entries[key]) for key in INFO_KEYS}
    except ValueError:
        raise common.ConversionError(f"{path}: ED, ES and NbFrame must be integers, got "
                                     f"{ {key: entries[key] for key in INFO_KEYS} }") from None
    if not (1 <= info["ED"] <= info["NbFrame"] and 1 <= info["ES"] <= info["NbFrame"]) or info["ED"] == info["ES"]:
        raise common.ConversionError(f"{path}: ED {info['ED']} and ES {info['ES']} must be two different frames "
                                     f"in 1..NbFrame {info['NbFrame']}")
    return info


def patient_frames(folder: Path, test: bool, test_labels: bool, problems: common.Problems) -> list[ACDCFrame]:
    """The ED and ES frames of one patient folder; every file nnU-Net's ``copy_files`` would mis-copy is a problem."""
    info = problems.check(folder / INFO_FILE, read_info, folder / INFO_FILE)
    if info is None:
        return []
    patient = folder.name
    expected_images = {frame_name(patient, info[key]) for key in ("ED", "ES")}
    gz_files = {p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(".gz")}
    frames = []
    for image in sorted(expected_images):
        gt = image.replace(".nii.gz", "_gt.nii.gz")
        if image not in gz_files:
            hint = (f" (found {image[:-3]}: nnU-Net's ACDC conversion reads only .nii.gz files, gzip it)"
                    if (folder / image[:-3]).is_file() else "")
            problems.add(folder / image, f"{folder / image} is missing: {INFO_FILE} names this frame as ED/ES{hint}")
        elif not test and gt not in gz_files:
            problems.add(folder / image, f"{folder / image} has no label {gt}")
        else:
            keep_label = gt in gz_files and (not test or test_labels)
            frames.append(ACDCFrame(folder / image, folder / gt if keep_label else None, test))
    expected = expected_images | {name.replace(".nii.gz", "_gt.nii.gz") for name in expected_images}
    for name in sorted(gz_files - expected - {cine_name(patient)}):
        path = folder / name
        if name.endswith("_gt.nii.gz"):
            problems.add(path, f"{path} has no image {name.replace('_gt', '')} of an ED/ES frame of {INFO_FILE}")
        else:
            problems.add(path, f"{path} is not an ED/ES frame of {INFO_FILE}, but nnU-Net's ACDC conversion would "
                               f"copy it as an image: remove it")
    return frames


def discover_frames(database: Path, test_labels: bool, problems: common.Problems) -> list[ACDCFrame]:
    """Every ED/ES frame of ``database/training`` and ``database/testing`` (problems collected)."""
    frames = []
    for subset in (TRAINING, TESTING):
        folder = database / subset
        if not folder.is_dir():
            problems.add(folder, f"{folder} does not exist: nnU-Net's ACDC conversion reads {TRAINING}/ and "
                                 f"{TESTING}/ of the {DATABASE} folder")
            continue
        patients = 0
        for patient in sorted(p for p in folder.iterdir() if p.is_dir()):
            if PATIENT_FOLDER.fullmatch(patient.name) is None:
                problems.add(patient, f"{patient} is not a patientNNN folder, but nnU-Net's ACDC conversion would "
                                      f"copy its .gz files: remove it")
            else:
                patients += 1
                frames += patient_frames(patient, subset == TESTING, test_labels, problems)
        if subset == TRAINING and patients < MIN_TRAINING_PATIENTS:
            problems.add(folder, f"{folder} has {patients} patient folders; nnU-Net's patient-wise 5-fold "
                                 f"split needs at least {MIN_TRAINING_PATIENTS}")
    return frames


def check_frame(frame: ACDCFrame, folder: Path | None) -> str:
    """Read one frame (and its label) completely: finite voxels, label values 0..3, the same grid as the image."""
    image = common.read_image(frame.image)
    if frame.label is not None:
        common.read_label(frame.label, sorted(ACDC_LABELS.values()))
        fix = common.geometry_fix(common.read_header(frame.image), common.read_header(frame.label))
        if fix.action != "same":
            raise common.ConversionError(f"{frame.label} does not have the geometry of {frame.image.name} "
                                         f"({fix.reason}); nnU-Net's ACDC conversion copies files as they are")
    return f"{frame.image.name}: {image.GetSize()} ok"


def expected_files(frames: list[ACDCFrame]) -> set[str]:
    """The files the dataset folder must hold after the copy, relative to it."""
    files = set()
    for frame in frames:
        files.add(common.image_file(Path(), frame.case_id, common.NIFTI_ENDING, frame.test).as_posix())
        if frame.label is not None:
            files.add(common.label_file(Path(), frame.case_id, common.NIFTI_ENDING, frame.test).as_posix())
    return files


def copy_with_nnunet(database: Path, frames: list[ACDCFrame], partial: Path) -> int:
    """nnU-Net's ``copy_files`` into ``partial`` plus the kept test labels; every written file is checked."""
    folders = [partial / name for name in ("imagesTr", "labelsTr", "imagesTs")]
    for folder in folders:
        folder.mkdir()
    num_training = nnunet_acdc.copy_files(database, *folders)
    for frame in frames:
        if frame.test and frame.label is not None:
            target = common.label_file(partial, frame.case_id, common.NIFTI_ENDING, test=True)
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(frame.label, target)
    written = {p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file()}
    if written != expected_files(frames):
        raise common.WriteError(f"nnU-Net's copy_files wrote {sorted(written ^ expected_files(frames))[:10]} "
                                f"other than expected")
    for path in sorted(partial.rglob("*.nii.gz")):
        try:
            common.check_nifti_complete(path)
        except common.ConversionError as error:
            raise common.WriteError(f"the copy {path.name} is incomplete: {error}") from None
    return num_training


def convert_acdc(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "ACDC",
                 test_labels: bool = True, overwrite: bool = False, dry_run: bool = False,
                 num_processes: int = 1) -> Path:
    """Validate the ACDC ``database`` folder, then convert it with nnU-Net's functions into
    ``output_folder/Dataset{id:03d}_{name}`` atomically (with ``splits_final.json``); returns the folder."""
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    database = common.check_input_root(input_root, f"the {DATABASE} folder (holding {TRAINING}/ and {TESTING}/)")
    if not (database / TRAINING).is_dir() and (database / DATABASE / TRAINING).is_dir():
        database = database / DATABASE
    problems = common.Problems()
    frames = discover_frames(database, test_labels, problems)
    problems.raise_if_any()
    common.convert_cases(check_frame, frames, None, num_processes)
    training = [f.case_id for f in frames if not f.test]
    if dry_run:
        print(f"Dry run: all {len(frames)} frames are valid; would write {len(training)} training and "
              f"{len(frames) - len(training)} test cases, dataset.json and splits_final.json to {target}"
              f"{' (replacing it)' if target.exists() else ''}; nothing was written", flush=True)
        return target
    with common.atomic_dataset(target, overwrite) as partial:
        num_training = copy_with_nnunet(database, frames, partial)
        common.write_dataset_json(partial, common.DatasetJson(
            channel_names=CHANNEL_NAMES, labels=ACDC_LABELS, file_ending=common.NIFTI_ENDING,
            dataset_name=dataset_name, reference=REFERENCE, license="see the ACDC terms of use",
            description="ACDC cine MRI, ED and ES frames; converted with nnU-Net's Dataset027_ACDC functions",
            converted_by="nnunet_ext.dataset_conversion.acdc"), num_training)
        common.write_splits(partial, nnunet_acdc.create_ACDC_split(str(partial / "labelsTr")), training)
    print(f"Converted {len(training)} training and {len(frames) - len(training)} test frames to {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_acdc``; exits 1 with ``error: ...`` on bad input."""
    parser = common.converter_parser("nnunet_ext_convert_acdc",
                                     "Convert ACDC with nnU-Net's Dataset027_ACDC functions, validated and atomic.",
                                     default_name="ACDC",
                                     input_help=f"the {DATABASE} folder (holding {TRAINING}/ and {TESTING}/)")
    parser.add_argument("--no-test-labels", dest="test_labels", action="store_false",
                        help="do not keep the testing patients' _gt files as labelsTs")
    common.run_converter_cli(parser, argv, lambda a: convert_acdc(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.test_labels, a.overwrite, a.dry_run,
        a.num_processes))


if __name__ == "__main__":
    main()
