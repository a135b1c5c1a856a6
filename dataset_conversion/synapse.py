"""Convert Synapse multi-organ abdominal CT (BTCV, MICCAI 2015) to an nnU-Net v2 raw dataset.

Real layout (``RawData.zip`` of the "Multi-Atlas Labeling Beyond the Cranial Vault" challenge)::

    RawData/Training/img/img0001.nii.gz .. img0040.nii.gz      (30 cases: 0001-0010, 0021-0040)
    RawData/Training/label/label0001.nii.gz .. label0040.nii.gz
    RawData/Testing/img/img0061.nii.gz .. img0080.nii.gz       (20 cases, no labels)

Labels (13 organs): 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver,
7 stomach, 8 aorta, 9 inferior vena cava, 10 portal and splenic vein, 11 pancreas, 12 right
adrenal gland, 13 left adrenal gland.

Output, in ``<output>/Dataset{id:03d}_{name}/``::

    imagesTr/synapse_0005_0000.nii.gz   labelsTr/synapse_0005.nii.gz   imagesTs/synapse_0061_0000.nii.gz
    dataset.json        (channel 0 "CT"; the labels of the task chosen with --organs)
    splits_final.json   (fold 0: the TransUNet split; folds 1-5: nnU-Net's own 5-fold split)

Tasks (``--organs``):

* ``8`` (default): the 8-organ task of TransUNet, Swin-Unet and DLKUNet, labels remapped
  {1:1, 2:2, 3:3, 4:4, 6:5, 7:6, 8:7, 11:8} (1 spleen, 2 right kidney, 3 left kidney,
  4 gallbladder, 5 liver, 6 stomach, 7 aorta, 8 pancreas); esophagus, IVC, veins and adrenals
  become background;
* ``13``: the full BTCV task, labels as they are.

Split (``--split transunet``, default): ``splits_final.json`` holds six folds. **Fold 0 is the
TransUNet split** (Chen et al. 2021, used by DLKUNet): train on the 18 cases 5, 6, 7, 9, 10, 21,
23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40 and validate on the 12 cases 1, 2, 3, 4, 8, 22,
25, 29, 32, 35, 36, 38, the ones those papers report as their test set: ``nnUNetv2_train ID 2d 0``
trains with it and its final validation scores those 12 cases. Folds 1-5 are nnU-Net's own 5-fold
split of all 30 cases (``generate_crossval_split``, seed 12345, the split nnU-Net makes when there
is no file), for a cross-validation (``nnUNetv2_train ID 2d 1`` .. ``5``). The planner copies
the file to nnUNet_preprocessed. ``--split none`` writes no file (nnU-Net then makes its 5 folds).

Quirks handled: case numbers with a gap (0011-0020 do not exist) and four digits: image and label
are paired by the number in the name, never by sorted position; the gallbladder is absent in two
cases (an empty class is fine); anisotropic slices (2.5-5 mm) are kept as they are (nnU-Net plans
for them); a label whose origin differs from its image gets the image geometry with a warning, a
flipped/permuted label is resampled exactly onto the image grid (``common.geometry_fix``).

Refused, each problem naming the file (all reported together, nothing written): a missing
``Training/img`` or ``Training/label`` folder, an image without label and a label without image,
a duplicate case number, a label of another size or spacing than its image, a label value outside
0..13 or not an integer, an unreadable or truncated file, non-finite voxels, a TransUNet case
missing (with ``--split transunet``), an existing output dataset (without ``--overwrite``).

Command line::

    nnunet_ext_convert_synapse RawData -d 541 [-n Synapse] [--organs 8|13] [--split transunet|none]
                               [-o OUTPUT] [--overwrite] [--dry-run] [-np N]
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the library's own alias)
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_ext.dataset_conversion import common

RAW_DATA = "RawData"
TRAINING_IMAGES = "Training/img"
TRAINING_LABELS = "Training/label"
TEST_IMAGES = "Testing/img"
IMAGE_PREFIX, LABEL_PREFIX = "img", "label"
TRAINING_NUMBERS = tuple(range(1, 11)) + tuple(range(21, 41))
BTCV_LABELS = {"background": 0, "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4,
               "esophagus": 5, "liver": 6, "stomach": 7, "aorta": 8, "inferior_vena_cava": 9,
               "portal_and_splenic_vein": 10, "pancreas": 11, "right_adrenal_gland": 12, "left_adrenal_gland": 13}
EIGHT_ORGAN_MAPPING = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
TRANSUNET_TRAIN = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
TRANSUNET_VAL = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
NNUNET_SPLIT_SEED = 12345
_NIFTI = r"\.nii(?:\.gz)?"
REFERENCE = ("Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault - Workshop and Challenge, "
             "https://www.synapse.org/#!Synapse:syn3193805; 8-organ task and split: Chen et al., TransUNet, "
             "arXiv:2102.04306")


def task_labels(organs: int) -> dict[str, int]:
    """dataset.json labels of the 13-organ task or of the 8-organ task (names of the mapped BTCV labels)."""
    if organs == 13:
        return dict(BTCV_LABELS)
    if organs == 8:
        names = {value: name for name, value in BTCV_LABELS.items()}
        return {"background": 0, **{names[btcv]: new for btcv, new in EIGHT_ORGAN_MAPPING.items()}}
    raise common.ConversionError(f"--organs must be 8 or 13, got {organs}")


def label_lookup(organs: int) -> np.ndarray:
    """Lookup table BTCV label -> task label (identity for 13 organs, ``EIGHT_ORGAN_MAPPING`` else 0 for 8)."""
    if organs == 13:
        return np.arange(len(BTCV_LABELS), dtype=np.uint8)
    table = np.zeros(len(BTCV_LABELS), dtype=np.uint8)
    for btcv, new in EIGHT_ORGAN_MAPPING.items():
        table[btcv] = new
    return table


def case_id(number: int) -> str:
    """``synapse_0005`` (training and test numbers do not overlap in BTCV: 1-40 vs 61-80)."""
    return f"synapse_{number:04d}"


@dataclass(frozen=True)
class SynapseCase:
    """One BTCV image with its label (``label`` None: a test image); ``fix`` puts the label onto the image grid."""

    number: int
    image: Path
    label: Path | None = None
    fix: common.GeometryFix | None = None
    organs: int = 8

    @property
    def test(self) -> bool:
        return self.label is None

    @property
    def case_id(self) -> str:
        return case_id(self.number)


def numbered_files(folder: Path, prefix: str, problems: common.Problems) -> dict[int, Path]:
    """Case number -> file for the ``{prefix}NNNN.nii(.gz)`` files in ``folder``; duplicates are problems."""
    pattern = re.compile(rf"{prefix}(\d+){_NIFTI}")

    def number(path: Path) -> int | None:
        match = pattern.fullmatch(path.name)
        return None if match is None else int(match.group(1))
    return common.index_by(common.find_files(folder, (".nii", ".nii.gz")), number, problems, what="case number")


def raw_data_folder(input_root: Path) -> Path:
    """The folder holding ``Training/``: the input itself or its ``RawData`` subfolder."""
    root = common.check_input_root(input_root, f"the {RAW_DATA} folder (holding Training/img and Training/label)")
    if not (root / "Training").is_dir() and (root / RAW_DATA / "Training").is_dir():
        root = root / RAW_DATA
    for sub in (TRAINING_IMAGES, TRAINING_LABELS):
        if not (root / sub).is_dir():
            raise common.ConversionError(f"{root / sub} does not exist: pass the {RAW_DATA} folder of the Synapse "
                                         f"release (holding {TRAINING_IMAGES}, {TRAINING_LABELS}, {TEST_IMAGES})")
    return root


def discover_cases(input_root: Path, organs: int, problems: common.Problems) -> list[SynapseCase]:
    """Find, pair by number and header-check every training pair and test image; problems are collected."""
    root = raw_data_folder(Path(input_root))
    images = numbered_files(root / TRAINING_IMAGES, IMAGE_PREFIX, problems)
    labels = numbered_files(root / TRAINING_LABELS, LABEL_PREFIX, problems)
    if not images and not labels:
        raise common.ConversionError(f"no {IMAGE_PREFIX}NNNN.nii.gz files found in {root / TRAINING_IMAGES}")
    tests = numbered_files(root / TEST_IMAGES, IMAGE_PREFIX, problems) if (root / TEST_IMAGES).is_dir() else {}
    cases = []
    pairs = common.pair_files(images, labels, problems, image_word=f"{IMAGE_PREFIX}{{key:04d}}.nii.gz",
                              label_word=f"{LABEL_PREFIX}{{key:04d}}.nii.gz")
    for number, image, label in pairs:
        image_header = problems.check(image, common.read_header, image)
        label_header = problems.check(label, common.read_header, label)
        if image_header is not None and label_header is not None:
            fix = problems.check(label, common.geometry_fix, image_header, label_header)
            if fix is not None:
                cases.append(SynapseCase(number, image, label, fix, organs))
    clashes = sorted(tests.keys() & images.keys())
    for number in clashes:
        problems.add(tests[number], f"{tests[number]} has the number of training image {images[number]}")
    for number in sorted(tests.keys() - images.keys()):
        if problems.check(tests[number], common.read_header, tests[number]) is not None:
            cases.append(SynapseCase(number, tests[number], organs=organs))
    return cases


def transunet_splits(cases: list[SynapseCase], problems: common.Problems) -> list[dict[str, list[str]]]:
    """Fold 0: the TransUNet 18/12 split; folds 1-5: nnU-Net's default 5-fold split of all training cases."""
    numbers = {case.number for case in cases if not case.test}
    missing = sorted(set(TRANSUNET_TRAIN + TRANSUNET_VAL) - numbers)
    if missing:
        problems.add(None, f"the TransUNet split needs training cases {[f'{n:04d}' for n in missing]}, which are "
                           f"missing or unusable; pass --split none to let nnU-Net make its own split")
        return []
    transunet = {"train": [case_id(n) for n in TRANSUNET_TRAIN], "val": [case_id(n) for n in TRANSUNET_VAL]}
    return [transunet, *generate_crossval_split(sorted(case_id(n) for n in numbers), seed=NNUNET_SPLIT_SEED)]


def convert_case(case: SynapseCase, folder: Path | None) -> str:
    """Read and check one case completely (label values 0..13); write it into ``folder`` (None: only check)."""
    image = common.read_image(case.image)
    label = None
    if case.label is not None:
        btcv = common.label_onto_volume(common.read_label(case.label, range(len(BTCV_LABELS))), image, case.fix)
        label = sitk.GetImageFromArray(label_lookup(case.organs)[sitk.GetArrayViewFromImage(btcv)])
        label.CopyInformation(image)
    if folder is not None:
        common.write_nifti(image, common.image_file(folder, case.case_id, common.NIFTI_ENDING, case.test))
        if label is not None:
            common.write_nifti(label, common.label_file(folder, case.case_id, common.NIFTI_ENDING))
    return f"{case.image.name} -> {case.case_id}"


def convert_synapse(input_root: Path, dataset_id: int, output_folder: Path, dataset_name: str = "Synapse",
                    organs: int = 8, split: str = "transunet", overwrite: bool = False, dry_run: bool = False,
                    num_processes: int = 1) -> Path:
    """Convert the Synapse ``RawData`` folder to ``output_folder/Dataset{id:03d}_{name}``; returns the folder.

    Raises :class:`common.ConversionError` naming every offending file; emits a
    :class:`common.ConversionWarning` per label whose geometry is replaced or reoriented.
    """
    if split not in ("transunet", "none"):
        raise common.ConversionError(f"--split must be 'transunet' or 'none', got {split!r}")
    labels = task_labels(organs)
    target = common.check_target(output_folder, dataset_id, dataset_name, overwrite, dry_run)
    problems = common.Problems()
    cases = discover_cases(Path(input_root), organs, problems)
    splits = transunet_splits(cases, problems) if split == "transunet" else None
    problems.raise_if_any()
    for case in cases:
        if case.fix is not None and case.fix.action != "same":
            warnings.warn(f"{case.case_id}: {case.fix.reason}", common.ConversionWarning, stacklevel=2)
    dataset_json = common.DatasetJson(
        channel_names={0: "CT"}, labels=labels, file_ending=common.NIFTI_ENDING, dataset_name=dataset_name,
        reference=REFERENCE, license="see the Synapse BTCV challenge terms of use (syn3193805)",
        description=f"Synapse multi-organ abdominal CT (BTCV), {organs}-organ task"
                    + ("; splits_final.json fold 0 = TransUNet 18/12 split, folds 1-5 = nnU-Net 5-fold"
                       if splits else ""),
        converted_by="nnunet_ext.dataset_conversion.synapse")
    return common.write_dataset(target, cases, convert_case, dataset_json, splits=splits, overwrite=overwrite,
                                dry_run=dry_run, num_processes=num_processes)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nnunet_ext_convert_synapse``; exits 1 with ``error: ...`` on bad input."""
    parser = common.converter_parser("nnunet_ext_convert_synapse",
                                     "Convert Synapse multi-organ CT (BTCV) to an nnU-Net v2 raw dataset.",
                                     default_name="Synapse",
                                     input_help="the RawData folder (holding Training/img, Training/label, "
                                                "Testing/img)")
    parser.add_argument("--organs", type=int, choices=(8, 13), default=8,
                        help="8: the TransUNet/DLKUNet 8-organ task (default); 13: all BTCV labels")
    parser.add_argument("--split", choices=("transunet", "none"), default="transunet",
                        help="transunet: splits_final.json with the TransUNet 18/12 split as fold 0 and nnU-Net's "
                             "5 folds as folds 1-5 (default); none: no splits_final.json")
    common.run_converter_cli(parser, argv, lambda a: convert_synapse(
        a.input_root, a.dataset_id, a.output_folder, a.dataset_name, a.organs, a.split, a.overwrite, a.dry_run,
        a.num_processes))


if __name__ == "__main__":
    main()
