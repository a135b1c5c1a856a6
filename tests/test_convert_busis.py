"""BUSIS converter (``nnunet_ext.dataset_conversion.busis``) on its synthetic twin: stem rule, masks, bad inputs."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunet_ext.dataset_conversion import busis
from nnunet_ext.dataset_conversion.common import ConversionError
from nnunet_ext.synthetic.ultrasound_breast_thyroid import BUSIS_ROOT, make_synthetic_busis
from tests.conversion_checks import refused


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default synthetic BUSIS release (``original/1..10.bmp``, ``GT/<same stem>.png``, mask 3 a BMP)."""
    return make_synthetic_busis(tmp_path_factory.mktemp("busis_release"))


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def copy_release(release: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release["dataset_folder"], tmp_path / BUSIS_ROOT))


def test_twin_layout_and_soft_masks(release: dict):
    folder = release["dataset_folder"]
    assert sorted(p.name for p in (folder / "original").iterdir()) == sorted(f"{n}.bmp" for n in range(1, 11))
    assert release["mask_files"]["3"] == "3.bmp" and release["mask_files"]["4"] == "4.png"
    assert Image.open(folder / "original" / "2.bmp").mode == "RGB"
    assert Image.open(folder / "original" / "1.bmp").mode == "L"
    soft = grey(folder / "GT" / "4.png")
    assert ((soft > 0) & (soft < 255)).any()  # anti-aliased edges: binarising is needed


def test_converted_cases_are_binarised_at_127(release: dict, tmp_path: Path):
    folder = busis.convert_busis(release["dataset_folder"], 522, tmp_path)
    stems = [str(n) for n in range(1, 11)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(f"busis_{s}.png" for s in stems)
    for stem in stems:
        image = Image.open(folder / "imagesTr" / f"busis_{stem}_0000.png")
        assert image.mode == "L"
        assert np.array_equal(np.asarray(image), grey(release["dataset_folder"] / "original" / f"{stem}.bmp"))
        label = np.asarray(Image.open(folder / "labelsTr" / f"busis_{stem}.png"))
        soft = grey(release["dataset_folder"] / "GT" / release["mask_files"][stem])
        assert np.array_equal(label, (soft > 127).astype(np.uint8))
        assert label.sum() == release["lesion_pixels"][stem] > 0
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 10


def test_stem_rule_and_folders(tmp_path: Path):
    """A release whose masks are ``<stem>_GT`` in folders of other names, converted with the matching options."""
    release = make_synthetic_busis(tmp_path / "release", num_cases=5, mask_stem="{stem}_GT")
    root = release["dataset_folder"]
    (root / "original").rename(root / "images")
    (root / "GT").rename(root / "masks")
    assert (root / "masks" / "1_GT.png").is_file()
    with pytest.raises(ConversionError, match=r"image folder \S+original does not exist"):
        busis.convert_busis(root, 522, tmp_path / "raw")
    with pytest.raises(ConversionError, match=r"1\.bmp has no mask 1\.bmp/\.png in \S+ \(by --mask-stem '\{stem\}'"):
        busis.convert_busis(root, 522, tmp_path / "raw", images="images", masks=root / "masks")
    with pytest.raises(ConversionError, match=r"does not contain '\{stem\}'"):
        busis.convert_busis(root, 522, tmp_path / "raw", images="images", masks="masks", rule="GT")
    folder = busis.convert_busis(root, 522, tmp_path / "raw", images="images", masks=root / "masks", rule="{stem}_GT")
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"busis_{n}.png" for n in range(1, 6)]


def test_images_and_masks_in_one_folder(release: dict, tmp_path: Path):
    """``case.bmp`` next to ``case_mask.png``: with ``--mask-stem '{stem}_mask'`` the masks are not taken as images."""
    folder = tmp_path / "one_folder"
    folder.mkdir()
    for stem in ("1", "2", "3"):
        shutil.copy(release["dataset_folder"] / "original" / f"{stem}.bmp", folder / f"{stem}.bmp")
        mask = release["dataset_folder"] / "GT" / release["mask_files"][stem]
        shutil.copy(mask, folder / f"{stem}_mask{mask.suffix}")
    with pytest.raises(ConversionError, match=r"images and masks are both in \S+one_folder: .* other than '\{stem\}'"):
        busis.convert_busis(folder, 522, tmp_path / "raw", images=".", masks=".")
    dataset = busis.convert_busis(folder, 522, tmp_path / "raw", images=".", masks=".", rule="{stem}_mask")
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == ["busis_1_0000.png", "busis_2_0000.png",
                                                                        "busis_3_0000.png"]
    label = np.asarray(Image.open(dataset / "labelsTr" / "busis_3.png"))
    assert label.sum() == release["lesion_pixels"]["3"]


def break_no_mask(root: Path) -> None:
    (root / "GT" / "5.png").unlink()


def break_no_image(root: Path) -> None:
    (root / "original" / "6.bmp").unlink()


def break_size(root: Path) -> None:
    Image.open(root / "GT" / "7.png").resize((20, 30)).save(root / "GT" / "7.png")


def break_value(root: Path) -> None:
    mask = grey(root / "GT" / "8.png").astype(np.uint16) * 257  # a 16-bit mask: values up to 65535
    Image.fromarray(mask).save(root / "GT" / "8.png")


def break_unreadable(root: Path) -> None:
    (root / "original" / "9.bmp").write_bytes(b"BM not a bitmap")


def break_duplicate_stem(root: Path) -> None:
    shutil.copy(root / "GT" / "3.bmp", root / "GT" / "3.png")


BAD_INPUTS = {
    "image without mask": (break_no_mask, r"original/5\.bmp has no mask 5\.bmp/\.png in"),
    "mask without image": (break_no_image, r"GT/6\.png has no image in \S+original \(its mask stem by .* is 6\)"),
    "mask of another size": (break_size, r"size mismatch: \S+GT/7\.png is 20x30"),
    "label value out of range": (break_value, r"GT/8\.png has mask values up to 65535, outside 0\.\.255"),
    "unreadable file": (break_unreadable, r"cannot read \S+original/9\.bmp"),
    "two masks with one stem": (break_duplicate_stem, r"duplicate mask stem 3: \S+3\.bmp and \S+3\.png"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(bad: str, release: dict, tmp_path: Path, capsys):
    root = copy_release(release, tmp_path)
    breaker, message = BAD_INPUTS[bad]
    breaker(root)
    output = tmp_path / "raw"
    output.mkdir()
    error = refused(busis.main, [root, "-d", "522", "-o", output], capsys)
    assert error.startswith("error: ") and re.search(message, error), error
    assert list(output.iterdir()) == []


def test_existing_dataset_is_kept_without_overwrite(release: dict, tmp_path: Path):
    folder = busis.convert_busis(release["dataset_folder"], 522, tmp_path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        busis.convert_busis(release["dataset_folder"], 522, tmp_path)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_planned_by_nnunet(planned_dataset):
    dataset = planned_dataset("busis")
    assert json.loads((dataset.preprocessed / "dataset.json").read_text())["numTraining"] == 10
    plans = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["spacing"] == [1.0, 1.0]
    assert len(list((dataset.preprocessed / "gt_segmentations").iterdir())) == 10
