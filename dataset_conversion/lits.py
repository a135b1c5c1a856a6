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
  match, the volume geometry is copied onto the label and a :class:`~common.ConversionWarning`
  names the case. Other label headers follow :func:`common.geometry_fix`: float noise is copied
  silently, an origin-only offset is copied with a warning, a flipped or permuted axis is
  resampled exactly onto the volume grid with a warning, anything else is refused with the reason.
* Labels are written as uint8; values outside {0, 1, 2}, non-integral values and NaN are errors.
* A truncated ``.nii``/``.nii.gz`` and NaN/inf voxels in a volume are errors naming the file
  (``--nan-to VALUE`` replaces non-finite volume voxels instead).

Pairing, duplicates and headers are checked first; if anything is wrong, the voxels of the
remaining cases are still read and checked (nothing written) and every problem is reported in
one error. Otherwise voxel content is checked case by case while converting into a hidden
temporary sibling folder, which is renamed into place only when every case is good, so a failed
or interrupted run leaves no partial dataset and an existing one untouched (see
:mod:`nnunet_ext.dataset_conversion.common`).

Alternative route: the Medical Segmentation Decathlon ``Task03_Liver`` is a copy of the LiTS
training set (``imagesTr/liver_0..130.nii.gz``, labels 0 background, 1 liver, 2 cancer). nnU-Net
converts it itself::

    nnUNetv2_convert_MSD_dataset -i /path/to/Task03_Liver -overwrite_id 3 -np 4

``-i`` is the extracted folder (its name must stay ``Task03_Liver``: the dataset name is read from
it), ``-overwrite_id`` the target id (default: the task number, 3) and ``-np`` the number of
processes. It writes ``$nnUNet_raw/Dataset003_Liver``, skips ``._*``/``_*`` files, and refuses an
id already used in nnUNet_raw, nnUNet_preprocessed or nnUNet_results.

Command line::

    nnunet_ext_convert_lits INPUT_ROOT -d 3 [-n LiTS] [-o OUTPUT_FOLDER] [--overwrite] [--dry-run]
                            [-np 4] [--nan-to VALUE]
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.dataset_conversion import common

LABELS = {"background": 0, "liver": 1, "tumor": 2}
ALLOWED_LABEL_VALUES = sorted(LABELS.values())
_NIFTI = r"\.nii(?:\.gz)?"
VOLUME_PATTERN = re.compile(rf"volume-(\d+){_NIFTI}")
SEGMENTATION_PATTERN = re.compile(rf"segmentation-(\d+){_NIFTI}")
TEST_VOLUME_PATTERN = re.compile(rf"test-volume-(\d+){_NIFTI}")
REFERENCE = ("Bilic et al., The Liver Tumor Segmentation Benchmark (LiTS), Medical Image Analysis 84 "
             "(2023) 102680; https://competitions.codalab.org/competitions/17094")
DATASET_JSON = dict(channel_names={0: "CT"}, labels=dict(LABELS), file_ending=common.NIFTI_ENDING,
                    reference=REFERENCE, license="see the LiTS challenge terms of use (CodaLab competition 17094)",
                    description="LiTS: contrast-enhanced abdominal CT with liver and liver tumour labels",
                    converted_by="nnunet_ext.dataset_conversion.lits")


@dataclass(frozen=True)
class LiTSCase:
    """One case: ``volume-N`` + ``segmentation-N`` (training) or ``test-volume-N`` (``test``, no label)."""

    number: int
    volume: Path
    segmentation: Path | None = None
    fix: common.GeometryFix | None = None
    nan_to: float | None = None

    @property
    def test(self) -> bool:
        return self.segmentation is None

    @property
    def case_id(self) -> str:
        """nnU-Net case id, e.g. ``lits_005`` or ``lits_test_005``."""
        return f"lits_{'test_' if self.test else ''}{self.number:03d}"


def find_lits_files(files: list[Path], pattern: re.Pattern, problems: common.Problems) -> dict[int, Path]:
    """Map case number -> file for every file named exactly by ``pattern``; duplicates are problems."""
    def number(path: Path) -> int | None:
        match = pattern.fullmatch(path.name)
        return None if match is None else int(match.group(1))
    return common.index_by(files, number, problems, what="case number")


def label_fix(volume: common.Header, label: common.Header) -> common.GeometryFix:
    """How the label goes onto the volume grid: the LiTS identity-label quirk (``segmentation-53``) gets the
    volume geometry copied when the sizes match; everything else follows :func:`common.geometry_fix`."""
    if label.is_identity() and not volume.is_identity() and volume.size == label.size:
        return common.GeometryFix("copy", f"{label.path} has an identity geometry (spacing 1, origin 0, identity "
                                          f"direction) but {volume.path.name} does not; copying the volume "
                                          f"geometry onto the label")
    return common.geometry_fix(volume, label)


def discover_cases(input_root: Path, nan_to: float | None = None) -> tuple[list[LiTSCase], common.Problems]:
    """Find, pair and header-check every case under ``input_root``: the cases that passed and the problems found.
    When there are none, each label header fix is announced as a :class:`common.ConversionWarning` naming the case."""
    files = common.find_files(common.check_input_root(input_root, "the folder holding 'Training Batch 1/2'"),
                              (".nii", ".nii.gz"))
    problems = common.Problems()
    volumes = find_lits_files(files, VOLUME_PATTERN, problems)
    if not volumes:
        raise common.ConversionError(f"no LiTS training volumes (volume-N.nii) found under {input_root}")
    segmentations = find_lits_files(files, SEGMENTATION_PATTERN, problems)
    tests = find_lits_files(files, TEST_VOLUME_PATTERN, problems)
    pairs = common.pair_files(volumes, segmentations, problems, image_word="volume-{key}.nii(.gz)",
                              label_word="segmentation-{key}.nii(.gz)")
    cases = []
    for number, volume, segmentation in pairs:
        volume_header = problems.check(volume, common.read_header, volume)
        label_header = problems.check(segmentation, common.read_header, segmentation)
        if volume_header is None or label_header is None:
            continue
        fix = problems.check(segmentation, label_fix, volume_header, label_header)
        if fix is not None:
            cases.append(LiTSCase(number, volume, segmentation, fix, nan_to))
    for number in sorted(tests):
        if problems.check(tests[number], common.read_header, tests[number]) is not None:
            cases.append(LiTSCase(number, tests[number], nan_to=nan_to))
    if not len(problems):
        for case in cases:
            if case.fix is not None and case.fix.action != "same":
                warnings.warn(f"{case.case_id}: {case.fix.reason}", common.ConversionWarning, stacklevel=2)
    return cases, problems


def convert_case(case: LiTSCase, folder: Path | None) -> str:
    """Read and check one case completely; write it into ``folder`` (None: only check). Returns a progress note."""
    volume = common.read_image(case.volume, case.nan_to)
    label = None
    if case.segmentation is not None:
        label = common.label_onto_volume(common.read_label(case.segmentation, ALLOWED_LABEL_VALUES), volume,
                                         case.fix)
    if folder is not None:
        common.write_nifti(volume, common.image_file(folder, case.case_id, common.NIFTI_ENDING, case.test))
        if label is not None:
            common.write_nifti(label, common.label_file(folder, case.case_id, common.NIFTI_ENDING))
    return f"{case.volume.name} -> {case.case_id}"


def convert_lits(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "LiTS",
                 overwrite: bool = False, num_processes: int = 1, dry_run: bool = False,
                 nan_to: float | None = None) -> Path:
    """Convert the LiTS release under ``input_root`` to ``output_folder/Dataset{id:03d}_{name}``; returns it.

    Raises :class:`common.ConversionError` naming every offending file; emits a :class:`common.ConversionWarning`
    per label whose geometry is replaced or reoriented.
    """
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    cases, problems = discover_cases(Path(input_root), nan_to)
    return common.write_dataset(target, cases, convert_case, common.DatasetJson(dataset_name=dataset_name,
                                                                                **DATASET_JSON),
                                overwrite=overwrite, dry_run=dry_run, num_processes=num_processes, problems=problems)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_lits``; exits 1 with ``error: ...`` on bad input."""
    parser = common.add_nan_option(common.converter_parser(
        "nnunet_ext_convert_lits", "Convert LiTS to an nnU-Net v2 raw dataset.", default_name="LiTS",
        input_help="folder holding 'Training Batch 1/2' and the test volumes"))
    common.run_converter_cli(parser, argv, lambda a: convert_lits(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.overwrite, a.num_processes, a.dry_run,
        a.nan_to))


if __name__ == "__main__":
    main()
