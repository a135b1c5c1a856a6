"""ACDC converter (``nnunet_ext.dataset_conversion.acdc``, nnU-Net's Dataset027_ACDC functions behind our
conventions) on its synthetic twin: the release's layout and Info.cfg, nnU-Net's patient-wise split through the
raw folder, bad inputs."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the library's own alias)

from nnunet_ext.dataset_conversion import acdc
from nnunet_ext.dataset_conversion.common import ConversionError
from nnunet_ext.synthetic.acdc import make_synthetic_acdc

TRAINING = list(range(1, 11))
TESTING = [101, 102]


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def frame_files(database: Path, number: int, frame: int, subset: str = "training") -> tuple[Path, Path]:
    """(image, ``_gt`` label) of one frame of a patient."""
    name = f"patient{number:03d}"
    return (database / subset / name / f"{name}_frame{frame:02d}.nii.gz",
            database / subset / name / f"{name}_frame{frame:02d}_gt.nii.gz")


def rewrite(path: Path, voxels: np.ndarray) -> None:
    image = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(voxels)
    new.SetSpacing(image.GetSpacing())
    new.SetOrigin(image.GetOrigin())
    sitk.WriteImage(new, str(path), useCompression=True)


def assert_nothing_written(output: Path) -> None:
    """No dataset and no temporary folder: the output folder is absent or empty."""
    assert not output.exists() or list(output.iterdir()) == []


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default synthetic release (training patients 1-10, testing 101-102 with labels); read-only."""
    return make_synthetic_acdc(tmp_path_factory.mktemp("acdc_release"))


@pytest.fixture(scope="module")
def converted(release: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The release converted (two checking processes) with $nnUNet_preprocessed set to an empty folder that must
    stay empty (nnU-Net's own script writes its split there); returns (dataset folder, that folder)."""
    preprocessed = tmp_path_factory.mktemp("acdc_preprocessed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("nnUNet_preprocessed", str(preprocessed))
        folder = acdc.convert_acdc(release["database"], 542, tmp_path_factory.mktemp("acdc_raw"), num_processes=2)
    return folder, preprocessed


@pytest.fixture()
def database(release: dict, tmp_path: Path) -> Path:
    """A private copy of the release's database folder to break (the first 5 training patients, 1 testing)."""
    target = tmp_path / "database"
    for patient in [f"training/patient{n:03d}" for n in range(1, 6)] + ["testing/patient101"]:
        shutil.copytree(release["database"] / patient, target / patient)
    return target


def test_twin_has_the_real_layout(release: dict) -> None:
    """patientNNN folders with Info.cfg, the 4D cine, and the ED/ES frames named in Info.cfg with their _gt files;
    the frame files are exactly those frames of the cine; ES differs per patient, patient 3 has ED at frame 2."""
    database = release["database"]
    assert sorted(p.name for p in (database / "training").iterdir()) == (
        ["MANDATORY_CITATION.md"] + [f"patient{n:03d}" for n in TRAINING])
    assert sorted(p.name for p in (database / "testing").iterdir()) == ["MANDATORY_CITATION.md", "patient101",
                                                                        "patient102"]
    for number in TRAINING + TESTING:
        subset = "training" if number < 101 else "testing"
        folder = database / subset / f"patient{number:03d}"
        info = dict(line.split(": ") for line in (folder / "Info.cfg").read_text().splitlines())
        assert list(info) == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
        ed, es, frames = int(info["ED"]), int(info["ES"]), int(info["NbFrame"])
        assert (ed, es, frames) == (release["ed"][number], release["es"][number], release["num_frames"][number])
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["Info.cfg", f"patient{number:03d}_4d.nii.gz"]
            + [p.name for f in (ed, es) for p in frame_files(database, number, f, subset)])
        cine = sitk.ReadImage(str(folder / f"patient{number:03d}_4d.nii.gz"))
        assert cine.GetDimension() == 4 and cine.GetSize()[3] == frames
        for frame in (ed, es):
            image, label = frame_files(database, number, frame, subset)
            np.testing.assert_array_equal(array(image), sitk.GetArrayFromImage(cine)[frame - 1])
            assert set(np.unique(array(label))) == {0, 1, 2, 3}
        assert 5.0 <= sitk.ReadImage(str(image)).GetSpacing()[2] <= 10.0
    assert release["ed"][3] == 2 and len(set(release["es"].values())) > 3


def test_frames_copied_by_nnunet_with_its_dataset_json(release: dict, converted: tuple[Path, Path]) -> None:
    """nnU-Net's copy_files output: one case per ED/ES frame, images and labels byte-identical to the release,
    testing frames to imagesTs with their labels kept as labelsTs; nnU-Net's channel and label names."""
    folder, _ = converted
    database = release["database"]
    cases = [f"patient{n:03d}_frame{f:02d}" for n in TRAINING for f in sorted((release["ed"][n], release["es"][n]))]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    tests = [f"patient{n:03d}_frame{f:02d}" for n in TESTING for f in sorted((release["ed"][n], release["es"][n]))]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in tests]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in tests]
    for number, frame, subset in ((3, 2, "training"), (7, release["es"][7], "training"), (102, 1, "testing")):
        image, label = frame_files(database, number, frame, subset)
        images, labels = ("imagesTr", "labelsTr") if subset == "training" else ("imagesTs", "labelsTs")
        assert (folder / images / f"patient{number:03d}_frame{frame:02d}_0000.nii.gz").read_bytes() == \
            image.read_bytes()
        assert (folder / labels / f"patient{number:03d}_frame{frame:02d}.nii.gz").read_bytes() == label.read_bytes()
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "cineMRI"}
    assert dataset["labels"] == {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}
    assert dataset["numTraining"] == 20 and dataset["file_ending"] == ".nii.gz"


def test_patient_wise_split_in_the_raw_folder_only(converted: tuple[Path, Path]) -> None:
    """nnU-Net's create_ACDC_split in the dataset's splits_final.json: 5 folds, both frames of a patient in the
    same fold, every patient validated once; nothing written to $nnUNet_preprocessed."""
    folder, preprocessed = converted
    splits = json.loads((folder / "splits_final.json").read_text())
    assert len(splits) == 5
    patients = [sorted({case[:10] for case in fold["val"]}) for fold in splits]
    assert sorted(p for fold in patients for p in fold) == [f"patient{n:03d}" for n in TRAINING]
    for fold, val_patients in zip(splits, patients):
        assert len(val_patients) == 2 and len(fold["val"]) == 4 and len(fold["train"]) == 16
        assert not {case[:10] for case in fold["train"]} & set(val_patients)
    assert list(preprocessed.iterdir()) == []


def test_nnunet_plans_with_the_split_from_the_raw_folder(planned_dataset) -> None:
    """nnUNetv2_plan_and_preprocess --verify_dataset_integrity passes (the fixture) and copies the split."""
    dataset = planned_dataset("acdc")
    assert json.loads((dataset.preprocessed / "splits_final.json").read_text()) == \
        json.loads((dataset.raw / "splits_final.json").read_text())
    plans = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    assert len(plans["configurations"]["2d"]["patch_size"]) == 2
    assert len(list((dataset.preprocessed / "nnUNetPlans_2d").glob("*.b2nd"))) >= 20


def test_no_test_labels(release: dict, tmp_path: Path) -> None:
    folder = acdc.convert_acdc(release["database"], 542, tmp_path, test_labels=False)
    assert not (folder / "labelsTs").exists() and len(list((folder / "imagesTs").iterdir())) == 4


def test_frame_image_without_label_and_label_without_image(database: Path, tmp_path: Path) -> None:
    """A training frame without its _gt, a _gt without its frame image and a _gt of a frame that is not ED/ES:
    each file named, all in one error, nothing written."""
    _, label = frame_files(database, 2, 1)
    label.unlink()
    image, _ = frame_files(database, 4, 1)
    image.unlink()
    extra = database / "training" / "patient005" / "patient005_frame02_gt.nii.gz"
    shutil.copy(frame_files(database, 5, 1)[1], extra)
    with pytest.raises(ConversionError) as error:
        acdc.convert_acdc(database, 542, tmp_path / "out")
    message = str(error.value)
    assert "3 problems, nothing was written" in message
    assert f"{frame_files(database, 2, 1)[0]} has no label patient002_frame01_gt.nii.gz" in message
    assert f"{image} is missing: Info.cfg names this frame as ED/ES" in message
    assert f"{extra} has no image patient005_frame02.nii.gz of an ED/ES frame of Info.cfg" in message
    assert_nothing_written(tmp_path / "out")


def test_label_of_another_size(database: Path, tmp_path: Path) -> None:
    _, label = frame_files(database, 3, 2)
    rewrite(label, array(label)[:, :-1])
    with pytest.raises(ConversionError, match=r"size mismatch: .*patient003_frame02\.nii\.gz is .* but "
                                              r".*patient003_frame02_gt\.nii\.gz"):
        acdc.convert_acdc(database, 542, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_label_value_out_of_range(database: Path, tmp_path: Path) -> None:
    _, label = frame_files(database, 1, 1)
    voxels = array(label)
    voxels[0, :2, :2] = 4
    rewrite(label, voxels)
    with pytest.raises(ConversionError, match=r"patient001_frame01_gt\.nii\.gz has label values \[4\] outside "
                                              r"\[0, 1, 2, 3\]"):
        acdc.convert_acdc(database, 542, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_unreadable_frame(database: Path, tmp_path: Path) -> None:
    image, _ = frame_files(database, 101, 1, "testing")
    image.write_bytes(image.read_bytes()[:-100])
    with pytest.raises(ConversionError, match=r"patient101_frame01\.nii\.gz is truncated or corrupt"):
        acdc.convert_acdc(database, 542, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_info_cfg_and_folder_problems(release: dict, database: Path, tmp_path: Path) -> None:
    """Missing Info.cfg, an ES beyond NbFrame, a macOS ._ copy and a non-patient folder (both of which nnU-Net's
    copy_files would copy), an uncompressed frame, and too few patients: all named together."""
    (database / "training" / "patient001" / "Info.cfg").unlink()
    info = database / "training" / "patient002" / "Info.cfg"
    info.write_text(info.read_text().replace(f"ES: {release['es'][2]}", "ES: 40"))
    appledouble = database / "training" / "patient003" / "._patient003_frame02.nii.gz"
    appledouble.write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (database / "training" / "__MACOSX").mkdir()
    image, _ = frame_files(database, 4, release["es"][4])
    sitk.WriteImage(sitk.ReadImage(str(image)), str(image)[:-3])
    image.unlink()
    shutil.rmtree(database / "training" / "patient005")
    with pytest.raises(ConversionError) as error:
        acdc.convert_acdc(database, 542, tmp_path / "out")
    message = str(error.value)
    assert "6 problems, nothing was written" in message
    assert f"{database / 'training' / 'patient001' / 'Info.cfg'} is missing" in message
    assert f"{info}: ED 1 and ES 40 must be two different frames in 1..NbFrame {release['num_frames'][2]}" in message
    assert f"{appledouble} is not an ED/ES frame of Info.cfg, but nnU-Net's ACDC conversion would copy it" in message
    assert f"{database / 'training' / '__MACOSX'} is not a patientNNN folder" in message
    assert f"{image} is missing" in message and "reads only .nii.gz files, gzip it" in message
    assert f"{database / 'training'} has 4 patient folders; nnU-Net's patient-wise 5-fold split needs at least 5" \
        in message
    assert_nothing_written(tmp_path / "out")


def test_missing_testing_folder(database: Path, tmp_path: Path) -> None:
    shutil.rmtree(database / "testing")
    with pytest.raises(ConversionError, match=r"testing does not exist: nnU-Net's ACDC conversion reads"):
        acdc.convert_acdc(database, 542, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_existing_dataset_refused_kept_and_replaced(database: Path, tmp_path: Path) -> None:
    """Without --overwrite an existing dataset stays byte for byte; with it, it is replaced completely."""
    folder = acdc.convert_acdc(database, 542, tmp_path / "out")
    (folder / "old.txt").write_text("previous content")
    before = snapshot(tmp_path / "out")
    with pytest.raises(ConversionError, match=r"Dataset542_ACDC already exists; pass --overwrite"):
        acdc.convert_acdc(database, 542, tmp_path / "out")
    assert snapshot(tmp_path / "out") == before
    acdc.convert_acdc(database, 542, tmp_path / "out", overwrite=True)
    assert not (folder / "old.txt").exists() and [p.name for p in (tmp_path / "out").iterdir()] == [folder.name]


def test_console_command(database: Path, tmp_path: Path) -> None:
    """``python -m nnunet_ext.dataset_conversion.acdc``: --dry-run writes nothing, then converts into
    $nnUNet_raw; a bad label is one ``error:`` line naming the file, exit status 1."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}, "nnUNet_raw": str(tmp_path / "raw")}
    command = [sys.executable, "-m", "nnunet_ext.dataset_conversion.acdc", str(database.parent), "-d", "542"]
    dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would write 10 training and 2 test cases" in dry.stdout and not (tmp_path / "raw").exists()
    good = subprocess.run(command, capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[-1] == \
        f"Converted 10 training and 2 test frames to {tmp_path / 'raw' / 'Dataset542_ACDC'}"
    _, label = frame_files(database, 5, 1)
    rewrite(label, np.full_like(array(label), 9))
    bad = subprocess.run([*command, "-d", "543", "-n", "Other"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1] == f"error: {label} has label values [9] outside [0, 1, 2, 3]"
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset542_ACDC"]
