"""Synapse (BTCV) converter (``nnunet_ext.dataset_conversion.synapse``) on its synthetic twin: the release's
quirks, the 8- and 13-organ tasks, the TransUNet split as nnU-Net trains with it, bad inputs."""
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
import torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_ext.dataset_conversion import synapse
from nnunet_ext.dataset_conversion.common import ConversionError, ConversionWarning
from nnunet_ext.synthetic.synapse import make_synthetic_synapse

TRAINING = [*range(1, 11), *range(21, 41)]
TRANSUNET_TRAIN = [5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40]
TRANSUNET_VAL = [1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38]
SMALL = (1, 2, 21, 22)  # a 4-case release for the bad-input tests (converted with split="none")


def ids(numbers) -> list[str]:
    return [f"synapse_{n:04d}" for n in numbers]


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def image_path(raw: Path, number: int) -> Path:
    return raw / "Training" / "img" / f"img{number:04d}.nii.gz"


def label_path(raw: Path, number: int) -> Path:
    return raw / "Training" / "label" / f"label{number:04d}.nii.gz"


def rewrite(path: Path, voxels: np.ndarray | None = None, origin_shift: float = 0.0) -> None:
    """Rewrite a NIfTI file with new voxels and/or a shifted origin, keeping spacing and direction."""
    image = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) if voxels is None else voxels)
    new.SetSpacing(image.GetSpacing())
    new.SetOrigin(tuple(o + origin_shift for o in image.GetOrigin()))
    new.SetDirection(image.GetDirection())
    sitk.WriteImage(new, str(path), useCompression=True)


def assert_nothing_written(output: Path) -> None:
    """No dataset and no temporary folder: the output folder is absent or empty."""
    assert not output.exists() or list(output.iterdir()) == []


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones included) with a hash of its content."""
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default synthetic release (30 labelled cases, test images 0061 and 0062); read-only."""
    return make_synthetic_synapse(tmp_path_factory.mktemp("synapse_release"))


@pytest.fixture(scope="module")
def eight_organs(release: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release converted to the 8-organ task with the TransUNet split (the defaults)."""
    return synapse.convert_synapse(release["raw_data"], 541, tmp_path_factory.mktemp("synapse_raw"))


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    """A private 4-case release (``SMALL``, one test image) to break; returns its RawData folder."""
    return make_synthetic_synapse(tmp_path / "release", num_test=1, training_numbers=SMALL)["raw_data"]


def convert_small(raw: Path, output: Path, **kwargs) -> Path:
    return synapse.convert_synapse(raw, 541, output, split="none", **kwargs)


def test_twin_has_the_real_layout_and_quirks(release: dict) -> None:
    """RawData/Training/{img,label} with the real numbers (gap 0011-0020), test images without labels, the
    gallbladder absent in two cases, 2.5-5 mm slices, 13 labels."""
    raw = release["raw_data"]
    files = {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()}
    assert files == ({f"Training/img/img{n:04d}.nii.gz" for n in TRAINING}
                     | {f"Training/label/label{n:04d}.nii.gz" for n in TRAINING}
                     | {"Testing/img/img0061.nii.gz", "Testing/img/img0062.nii.gz"})
    assert release["gallbladder_absent"] == [7, 29]
    for number in TRAINING:
        label = sitk.ReadImage(str(label_path(raw, number)))
        image = sitk.ReadImage(str(image_path(raw, number)))
        expected = set(range(14)) - ({4} if number in (7, 29) else set())
        assert set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) == expected
        assert label.GetPixelID() == sitk.sitkUInt8 and image.GetPixelID() == sitk.sitkInt16
        assert image.GetSize() == label.GetSize() == release["sizes"][number]
        assert 2.5 <= image.GetSpacing()[2] <= 5.0 and 6 <= image.GetSize()[2] <= 10
    assert {release["spacings"][n][2] for n in TRAINING} >= {2.5, 5.0}


def test_eight_organ_task_files_and_mapping(release: dict, eight_organs: Path) -> None:
    """30 training cases and 2 test images named by number; labels mapped {1,2,3,4,6,7,8,11} -> 1..8, the other
    five organs to background; images voxel-identical with their spacing kept."""
    assert sorted(p.name for p in (eight_organs / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in ids(TRAINING)]
    assert sorted(p.name for p in (eight_organs / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids(TRAINING)]
    assert sorted(p.name for p in (eight_organs / "imagesTs").iterdir()) == [
        "synapse_0061_0000.nii.gz", "synapse_0062_0000.nii.gz"]
    mapping = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 5, 7: 6, 8: 7, 9: 0, 10: 0, 11: 8, 12: 0, 13: 0}
    for number in (1, 7, 29, 40):
        source, converted = array(label_path(release["raw_data"], number)), array(
            eight_organs / "labelsTr" / f"synapse_{number:04d}.nii.gz")
        for btcv, task in mapping.items():
            assert (converted[source == btcv] == task).all()
        assert (4 in converted) == (number not in (7, 29))  # absent gallbladder stays absent
        image = sitk.ReadImage(str(eight_organs / "imagesTr" / f"synapse_{number:04d}_0000.nii.gz"))
        source_image = sitk.ReadImage(str(image_path(release["raw_data"], number)))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source_image))
        assert image.GetSpacing() == source_image.GetSpacing()
        assert np.allclose(image.GetSpacing(), release["spacings"][number], atol=1e-6)  # float32 in NIfTI
    dataset = json.loads((eight_organs / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "spleen": 1, "right_kidney": 2, "left_kidney": 3,
                                 "gallbladder": 4, "liver": 5, "stomach": 6, "aorta": 7, "pancreas": 8}
    assert dataset["channel_names"] == {"0": "CT"} and dataset["numTraining"] == 30


def test_raw_split_is_transunet_then_nnunet_folds(eight_organs: Path) -> None:
    """splits_final.json: fold 0 = TransUNet 18/12, folds 1-5 = nnU-Net's default 5-fold split."""
    splits = json.loads((eight_organs / "splits_final.json").read_text())
    assert splits[0] == {"train": ids(TRANSUNET_TRAIN), "val": ids(TRANSUNET_VAL)}
    assert splits[1:] == generate_crossval_split(sorted(ids(TRAINING)), seed=12345, n_splits=5)
    assert sorted(i for fold in splits[1:] for i in fold["val"]) == sorted(ids(TRAINING))


def test_thirteen_organ_task_keeps_labels(release: dict, tmp_path: Path) -> None:
    """--organs 13: labels exactly as in BTCV; --split none: no splits_final.json."""
    folder = synapse.convert_synapse(release["raw_data"], 541, tmp_path, organs=13, split="none")
    for number in (2, 29):
        np.testing.assert_array_equal(array(folder / "labelsTr" / f"synapse_{number:04d}.nii.gz"),
                                      array(label_path(release["raw_data"], number)))
    assert len(json.loads((folder / "dataset.json").read_text())["labels"]) == 14
    assert not (folder / "splits_final.json").exists()


def test_nnunet_plans_and_trains_fold_0_with_the_transunet_split(planned_dataset, monkeypatch) -> None:
    """After nnUNetv2_plan_and_preprocess --verify_dataset_integrity (the fixture), nnU-Net's own
    splits_final.json holds the TransUNet split as fold 0, and the trainer that ``nnUNetv2_train ID 2d 0`` builds
    (``get_trainer_from_args``) splits the cases into exactly those 18 training and 12 validation cases."""
    dataset = planned_dataset("synapse")
    splits = json.loads((dataset.preprocessed / "splits_final.json").read_text())
    assert splits[0] == {"train": ids(TRANSUNET_TRAIN), "val": ids(TRANSUNET_VAL)} and len(splits) == 6
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, dataset.env[key])
    trainer = get_trainer_from_args(dataset.dataset_name, "2d", 0, device=torch.device("cpu"))  # nnUNetv2_train's
    train_keys, val_keys = trainer.do_split()
    assert sorted(train_keys) == ids(TRANSUNET_TRAIN) and sorted(val_keys) == ids(TRANSUNET_VAL)


def test_missing_transunet_case_names_it_and_split_none_converts(release: dict, tmp_path: Path) -> None:
    """Without case 0005 (image and label) the TransUNet split cannot be written: the error says which case and
    the way out; with split="none" the 29 other cases convert."""
    raw = Path(shutil.copytree(release["raw_data"], tmp_path / "RawData"))
    image_path(raw, 5).unlink()
    label_path(raw, 5).unlink()
    with pytest.raises(ConversionError, match=r"TransUNet split needs training cases \['0005'\].*--split none"):
        synapse.convert_synapse(raw, 541, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    folder = synapse.convert_synapse(raw, 541, tmp_path / "out", split="none")
    assert len(list((folder / "labelsTr").iterdir())) == 29


def test_image_without_label_and_label_without_image(small: Path, tmp_path: Path) -> None:
    """Both unpaired files are named in one error; pairing is by number, nothing is written."""
    label_path(small, 2).unlink()
    image_path(small, 21).unlink()
    with pytest.raises(ConversionError) as error:
        convert_small(small, tmp_path / "out")
    message = str(error.value)
    assert "2 problems, nothing was written" in message
    assert f"{image_path(small, 2)} has no label0002.nii.gz" in message
    assert f"{label_path(small, 21)} has no img0021.nii.gz" in message
    assert_nothing_written(tmp_path / "out")


def test_label_of_another_size(small: Path, tmp_path: Path) -> None:
    label = label_path(small, 22)
    rewrite(label, array(label)[:-1])
    with pytest.raises(ConversionError, match=r"size mismatch: .*img0022\.nii\.gz is .* but .*label0022\.nii\.gz"):
        convert_small(small, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_label_value_out_of_range(small: Path, tmp_path: Path) -> None:
    """A value 14 (BTCV has 0..13) is named with its file; found while converting, nothing is published."""
    label = label_path(small, 21)
    voxels = array(label)
    voxels[0, 0, 0] = 14
    rewrite(label, voxels)
    with pytest.raises(ConversionError, match=r"label0021\.nii\.gz has label values \[14\] outside \[0, 1, .*13\]"):
        convert_small(small, tmp_path / "out", organs=13)
    assert_nothing_written(tmp_path / "out")  # the temporary folder is gone too


def test_truncated_image(small: Path, tmp_path: Path) -> None:
    image = image_path(small, 1)
    image.write_bytes(image.read_bytes()[:-200])
    with pytest.raises(ConversionError, match=r"img0001\.nii\.gz is truncated or corrupt"):
        convert_small(small, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_label_origin_shift_gets_the_image_geometry_with_a_warning(small: Path, tmp_path: Path) -> None:
    rewrite(label_path(small, 2), origin_shift=3.0)
    with pytest.warns(ConversionWarning, match=r"synapse_0002: origin/direction of .*label0002\.nii\.gz"):
        folder = convert_small(small, tmp_path / "out")
    assert sitk.ReadImage(str(folder / "labelsTr" / "synapse_0002.nii.gz")).GetOrigin() == \
        sitk.ReadImage(str(image_path(small, 2))).GetOrigin()


def test_existing_dataset_is_refused_and_kept(small: Path, tmp_path: Path) -> None:
    """A second conversion to the same dataset fails without --overwrite; the first stays byte for byte."""
    output = tmp_path / "out"
    convert_small(small, output)
    before = snapshot(output)
    with pytest.raises(ConversionError, match=r"Dataset541_Synapse already exists; pass --overwrite"):
        convert_small(small, output)
    assert snapshot(output) == before


def test_console_command_error_dry_run_and_conversion(small: Path, tmp_path: Path) -> None:
    """``python -m nnunet_ext.dataset_conversion.synapse``: --dry-run writes nothing; a bad file is one
    ``error:`` line naming it with exit status 1; a good release converts into $nnUNet_raw."""
    command = [sys.executable, "-m", "nnunet_ext.dataset_conversion.synapse", str(small), "-d", "541",
               "--split", "none", "--organs", "13"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}, "nnUNet_raw": str(tmp_path / "raw")}
    dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would write 4 training and 1 test cases" in dry.stdout and not (tmp_path / "raw").exists()
    good = subprocess.run(command, capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stderr
    target = tmp_path / "raw" / "Dataset541_Synapse"
    assert good.stdout.splitlines()[-1] == f"Converted 4 training and 1 test cases to {target}"
    label_path(small, 1).unlink()
    bad = subprocess.run([*command, "-n", "Other", "-d", "543"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    assert bad.stderr == f"error: {image_path(small, 1)} has no label0001.nii.gz\n"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset541_Synapse"]
