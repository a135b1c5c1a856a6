"""BUSI converter (``nnunet_ext.dataset_conversion.busi``) on its synthetic twin: quirks, bad inputs, planning."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunet_ext.dataset_conversion import busi
from nnunet_ext.dataset_conversion.common import ConversionError
from nnunet_ext.synthetic.ultrasound_breast_thyroid import make_synthetic_busi
from tests.conversion_checks import refused

DATASET = "Dataset521_BUSI"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default synthetic BUSI release (benign 1-10, malignant 1-5, normal 1-3); read-only."""
    return make_synthetic_busi(tmp_path_factory.mktemp("busi_release"))


@pytest.fixture(scope="module")
def converted(release: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release converted with ``--include-normal`` and two worker processes."""
    output = tmp_path_factory.mktemp("busi_raw")
    return busi.convert_busi(release["dataset_folder"], 521, output, include_normal=True, num_processes=2)


def source(release: dict, name: str) -> Path:
    """A file of the release by its BUSI name, e.g. ``benign (4)_mask_1.png``."""
    return release["dataset_folder"] / name.split(" ")[0] / name


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def copy_release(release: dict, tmp_path: Path) -> Path:
    """A private, modifiable copy of the release's ``Dataset_BUSI_with_GT`` folder."""
    return Path(shutil.copytree(release["dataset_folder"], tmp_path / busi.ROOT_FOLDER))


def test_twin_has_the_real_quirks(release: dict):
    folder = release["dataset_folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["benign", "malignant", "normal"]
    names = sorted(p.name for p in (folder / "benign").iterdir())
    assert names.index("benign (10).png") < names.index("benign (2).png")  # text order is not number order
    assert {"benign (4)_mask_1.png", "benign (7)_mask_2.png", "malignant (2)_mask_1.png"} <= {
        p.name for p in folder.rglob("*_mask_*.png")}
    assert {Image.open(source(release, n)).mode for n in release["rgba_masks"]} == {"RGBA"}
    assert {Image.open(source(release, n)).mode for n in release["rgb_masks"]} == {"RGB"}
    assert Image.open(source(release, "benign (1)_mask.png")).mode == "L"
    image = np.asarray(Image.open(source(release, "malignant (3).png")))
    assert image.ndim == 3 and image.shape[2] == 3 and (image == image[..., :1]).all()  # RGB with grey content
    assert len(set(release["shapes"].values())) > 10
    assert all(40 <= side <= 80 for shape in release["shapes"].values() for side in shape)
    assert not grey(source(release, "normal (2)_mask.png")).any()


def test_lesion_is_hypoechoic(release: dict):
    """The lesion is learnable: on every lesion image its mean grey value is far below the rest's."""
    for category in ("benign", "malignant"):
        for number in release["numbers"][category]:
            image = grey(source(release, busi.image_name(category, number)))
            lesion = grey(source(release, busi.mask_name(category, number))) > 0
            assert image[lesion].mean() < 0.7 * image[~lesion].mean()


def test_cases_images_and_merged_masks(release: dict, converted: Path):
    expected = [busi.case_id(c, n) for c in busi.CATEGORIES for n in release["numbers"][c]]
    assert len(expected) == 18 and "benign_0010" in expected
    assert sorted(p.name for p in (converted / "imagesTr").iterdir()) == sorted(f"{c}_0000.png" for c in expected)
    assert sorted(p.name for p in (converted / "labelsTr").iterdir()) == sorted(f"{c}.png" for c in expected)
    for category in busi.CATEGORIES:
        for number in release["numbers"][category]:
            case = busi.case_id(category, number)
            image = Image.open(converted / "imagesTr" / f"{case}_0000.png")
            assert image.mode == "L"
            assert np.array_equal(np.asarray(image), grey(source(release, busi.image_name(category, number))))
            masks = [grey(source(release, busi.mask_name(category, number, k)))
                     for k in range(1 + release["extra_masks"].get(case, 0))]
            label = np.asarray(Image.open(converted / "labelsTr" / f"{case}.png"))
            assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
            assert np.array_equal(label, np.logical_or.reduce([m == 255 for m in masks]).astype(np.uint8))
            assert label.sum() == release["lesion_pixels"][case]
    three_lesions = np.asarray(Image.open(converted / "labelsTr" / "benign_0007.png"))
    assert three_lesions.sum() > max((grey(source(release, busi.mask_name("benign", 7, k))) > 0).sum()
                                     for k in range(3))
    info = json.loads((converted / "dataset.json").read_text())
    assert (info["numTraining"], info["file_ending"], info["labels"]) == (18, ".png", {"background": 0, "lesion": 1})
    assert info["channel_names"] == {"0": "grey"}


def test_default_is_benign_and_malignant_and_rgb_option(release: dict, tmp_path: Path):
    folder = busi.convert_busi(release["dataset_folder"], 521, tmp_path, rgb=True)
    cases = sorted(p.name for p in (folder / "labelsTr").iterdir())
    assert len(cases) == 15 and not any(c.startswith("normal") for c in cases)
    channels = sorted(p.name for p in (folder / "imagesTr").iterdir() if p.name.startswith("malignant_0001"))
    assert channels == ["malignant_0001_0000.png", "malignant_0001_0001.png", "malignant_0001_0002.png"]
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {"0": "R", "1": "G", "2": "B"}


def test_mask_threshold_option(release: dict, tmp_path: Path):
    root = copy_release(release, tmp_path)
    mask = grey(root / "benign" / "benign (2)_mask.png").copy()
    mask[mask == 255] = 200  # a resampled copy: lesion 200, plus one faint pixel at 100
    mask[0, 0] = 100
    Image.fromarray(mask).save(root / "benign" / "benign (2)_mask.png")
    with pytest.raises(ConversionError, match=r"benign \(2\)_mask\.png has label values \[100, 200\] outside"):
        busi.convert_busi(root, 521, tmp_path / "strict")
    folder = busi.convert_busi(root, 521, tmp_path / "raw", mask_threshold=127)
    label = np.asarray(Image.open(folder / "labelsTr" / "benign_0002.png"))
    assert np.array_equal(label, (mask > 127).astype(np.uint8)) and label[0, 0] == 0


def break_no_mask(root: Path) -> None:
    (root / "benign" / "benign (5)_mask.png").unlink()


def break_no_image(root: Path) -> None:
    (root / "malignant" / "malignant (3).png").unlink()


def break_size(root: Path) -> None:
    path = root / "benign" / "benign (2)_mask.png"
    Image.open(path).resize((31, 29)).save(path)


def break_value(root: Path) -> None:
    path = root / "malignant" / "malignant (4)_mask.png"  # an RGBA mask
    array = np.asarray(Image.open(path)).copy()
    array[3, 5, :3] = 7
    Image.fromarray(array, mode="RGBA").save(path)


def break_unreadable(root: Path) -> None:
    path = root / "benign" / "benign (8).png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def break_colour(root: Path) -> None:
    path = root / "benign" / "benign (6)_mask.png"  # an RGB mask
    array = np.asarray(Image.open(path)).copy()
    array[..., 1:] = 0
    Image.fromarray(array).save(path)


def break_name(root: Path) -> None:
    shutil.copy(root / "benign" / "benign (1).png", root / "benign" / "benign(11).png")


BAD_INPUTS = {
    "image without mask": (break_no_mask, r"benign/benign \(5\)\.png has no mask 'benign \(5\)_mask\.png'"),
    "mask without image": (break_no_image, r"malignant \(3\)_mask\.png has no image 'malignant \(3\)\.png'"),
    "mask of another size": (break_size, r"size mismatch: \S+benign \(2\)_mask\.png is 31x29 .* is \d+x\d+"),
    "label value out of range": (break_value, r"malignant \(4\)_mask\.png has label values \[7\] outside \[0, 255\]"),
    "unreadable file": (break_unreadable, r"cannot read \S+benign \(8\)\.png"),
    "colour mask": (break_colour, r"benign \(6\)_mask\.png is a colour mask"),
    "bad file name": (break_name, r"benign\(11\)\.png is not named like a BUSI benign file"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(bad: str, release: dict, tmp_path: Path, capsys):
    root = copy_release(release, tmp_path)
    breaker, message = BAD_INPUTS[bad]
    breaker(root)
    output = tmp_path / "raw"
    output.mkdir()
    error = refused(busi.main, [root, "-d", "521", "-o", output], capsys)
    assert error.startswith("error: ") and re.search(message, error), error
    assert list(output.iterdir()) == []


def test_all_problems_are_reported_together(release: dict, tmp_path: Path):
    root = copy_release(release, tmp_path)
    break_no_mask(root)
    break_no_image(root)
    with pytest.raises(ConversionError, match=r"^2 problems, nothing was written") as error:
        busi.convert_busi(root, 521, tmp_path / "raw")
    assert "benign (5).png" in str(error.value) and "malignant (3)_mask.png" in str(error.value)
    assert not (tmp_path / "raw").exists()


def test_existing_dataset_is_kept_without_overwrite(release: dict, tmp_path: Path, capsys):
    folder = busi.convert_busi(release["dataset_folder"], 521, tmp_path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        busi.main([str(release["dataset_folder"]), "-d", "521", "-o", str(tmp_path), "--include-normal"])
    assert exit_info.value.code == 1
    assert f"{folder} already exists; pass --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]  # no temporary sibling left
    busi.main([str(release["dataset_folder"]), "-d", "521", "-o", str(tmp_path), "--include-normal", "--overwrite"])
    assert len(list((folder / "labelsTr").iterdir())) == 18
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]


def test_dry_run_writes_nothing(release: dict, tmp_path: Path, capsys):
    busi.main([str(release["dataset_folder"]), "-d", "521", "-o", str(tmp_path), "--dry-run"])
    assert "Dry run: all 15 cases are valid" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_planned_by_nnunet(planned_dataset):
    """``nnUNetv2_plan_and_preprocess -c 2d --verify_dataset_integrity`` accepts the converted twin."""
    dataset = planned_dataset("busi")
    plans = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["spacing"] == [1.0, 1.0]
    assert json.loads((dataset.preprocessed / "dataset.json").read_text())["numTraining"] == 15
    cases = sorted(p.name for p in (dataset.preprocessed / "gt_segmentations").iterdir())
    assert len(cases) == 15 and cases[0] == "benign_0001.png"
    fingerprint = json.loads((dataset.preprocessed / "dataset_fingerprint.json").read_text())
    assert all(40 <= side <= 80 for shape in fingerprint["shapes_after_crop"] for side in shape[1:])
