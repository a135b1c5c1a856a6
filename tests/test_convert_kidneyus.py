"""kidneyUS converter (``nnunet_ext.dataset_conversion.kidneyus``) on its synthetic twin: quirks, bad inputs,
planning by nnU-Net."""
import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from nnunet_ext.dataset_conversion import kidneyus
from nnunet_ext.dataset_conversion.common import ConversionError, ConversionWarning
from nnunet_ext.synthetic.kidneyus import make_synthetic_kidneyus
from tests.conversion_checks import files_of, refused

DATASET = "Dataset531_KidneyUS"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default synthetic kidneyUS release (seed 0); read-only."""
    return make_synthetic_kidneyus(tmp_path_factory.mktemp("kidneyus_release"))


def image(release: dict, name: str) -> Path:
    return release["root"] / "images" / name


def mask(root: Path, name: str, task: str = "capsule", annotator: int = 1) -> Path:
    """A mask of the release (or of a copy) at ``root``."""
    return root / "labels" / f"reviewed_masks_{annotator}" / task / name


def kept_names(release: dict) -> list[str]:
    """The files one DICOM id each: per duplicate group the highest-numbered file that has an image."""
    return [n for n in release["image_names"] if n not in release["duplicate_with_images"][:-1]]


def copy_release(release: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release["root"], tmp_path / "kidneyUS"))


def test_twin_has_the_real_layout_and_quirks(release: dict):
    root = release["root"]
    assert sorted(p.name for p in (root / "labels").iterdir()) == [
        "reviewed_labels_1.csv", "reviewed_labels_2.csv", "reviewed_masks_1", "reviewed_masks_2"]
    for annotator in (1, 2):
        for task in ("capsule", "regions"):
            names = sorted(p.name for p in mask(release["root"], "", task, annotator).iterdir())
            assert names == sorted(release["names"])
    assert len(release["names"]) == 14 and len(release["image_names"]) == 12
    dicom_ids = [name.split("_")[1] for name in release["names"]]
    assert len(set(dicom_ids)) == 11  # 14 annotated files, 11 DICOM ids (real: 534 files, 514 ids)
    assert [n for n in release["duplicate_without_images"] if image(release, n).exists()] == [
        "414_IM-0026-0001_anon.png"]
    assert all(image(release, n).exists() for n in release["duplicate_with_images"])
    modes = {Image.open(image(release, n)).mode for n in release["image_names"]}
    assert modes == {"L", "RGB"}
    rgb = np.asarray(Image.open(image(release, next(n for n in release["image_names"] if release["rgb"][n]))))
    assert (rgb == rgb[..., :1]).all()  # RGB with grey content
    assert len(set(release["shapes"].values())) >= 3
    for task in ("capsule", "regions"):
        for annotator in (1, 2):
            empty = np.asarray(Image.open(mask(release["root"], release["empty_case"], task, annotator)))
            assert empty.dtype == np.uint8 and not empty.any()
    assert not np.asarray(Image.open(mask(release["root"], release["empty_regions_case"], "regions", 1))).any()
    assert np.asarray(Image.open(mask(release["root"], release["empty_regions_case"], "capsule", 1))).any()
    assert np.asarray(Image.open(mask(release["root"], release["empty_regions_case"], "regions", 2))).any()
    values = np.asarray(Image.open(mask(release["root"], "1_IM-0001-0059_anon.png", "regions", 2)))
    assert sorted(np.unique(values)) == [0, 1, 2, 3]


def test_csv_polygons_are_the_masks(release: dict):
    """The VIA export holds the polygons whose rasterisation are the PNG masks (as in the real release)."""
    with open(release["root"] / "labels" / "reviewed_labels_2.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["filename"] for r in rows} == set(release["names"])
    name = "100_IM-0246-0030_anon.png"
    shape = release["shapes"][name]
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for row in (r for r in rows if r["filename"] == name):
        region = json.loads(row["region_shape_attributes"])
        anatomy = json.loads(row["region_attributes"])["Anatomy"]
        if anatomy == "Capsule":
            continue
        draw.polygon(list(zip(region["all_points_x"], region["all_points_y"])), fill=kidneyus.ANATOMY[anatomy][1])
    assert np.array_equal(np.asarray(canvas), np.asarray(Image.open(mask(release["root"], name, "regions", 2))))
    assert [r["region_count"] for r in rows if r["filename"] == release["empty_case"]] == ["0"]


def test_kidney_regions_are_learnable(release: dict):
    """Central echo complex bright, medulla darkest, cortex in between, on every image."""
    for name in release["image_names"]:
        regions = release["masks"][name][1]["regions"]
        if not regions.any():  # the empty cases
            continue
        grey = np.asarray(Image.open(image(release, name)).convert("L")).astype(float)
        cec, medulla, cortex = (grey[regions == v].mean() for v in (1, 2, 3))
        assert cec > cortex + 30 and cortex > medulla


def test_capsule_annotator_1_with_duplicates_dropped(release: dict, tmp_path: Path):
    with pytest.warns(ConversionWarning) as caught:
        folder = kidneyus.convert_kidneyus(release["root"], 531, tmp_path, num_processes=2)
    messages = [str(w.message) for w in caught]
    assert ("DICOM id IM-0026-0001 appears as 3 files: kept 414_IM-0026-0001_anon.png, dropped duplicate(s) "
            "110_IM-0026-0001_anon.png, 402_IM-0026-0001_anon.png") in messages
    assert ("DICOM id IM-0055-0009 appears as 2 files: kept 599_IM-0055-0009_anon.png, dropped duplicate(s) "
            "164_IM-0055-0009_anon.png") in messages
    assert len(messages) == 2
    expected = sorted(kidneyus.case_id(n.removesuffix(".png")) for n in kept_names(release))
    assert len(expected) == 11 and "kidneyus_299_IM-0068-0001" in expected  # the empty case stays (a negative)
    assert sorted(p.name.removesuffix(".png") for p in (folder / "labelsTr").iterdir()) == expected
    for name in kept_names(release):
        case = kidneyus.case_id(name.removesuffix(".png"))
        written = Image.open(folder / "imagesTr" / f"{case}_0000.png")
        assert written.mode == "L"
        assert np.array_equal(np.asarray(written), np.asarray(Image.open(image(release, name)).convert("L")))
        label = np.asarray(Image.open(folder / "labelsTr" / f"{case}.png"))
        assert np.array_equal(label, release["masks"][name][1]["capsule"])
    info = json.loads((folder / "dataset.json").read_text())
    assert (info["numTraining"], info["labels"], info["channel_names"]) == (11, {"background": 0, "capsule": 1},
                                                                           {"0": "grey"})


def test_regions_of_annotator_2(release: dict, tmp_path: Path):
    with pytest.warns(ConversionWarning):
        folder = kidneyus.convert_kidneyus(release["root"], 531, tmp_path, task="regions", annotator=2)
    for name in kept_names(release):
        label = np.asarray(Image.open(folder / "labelsTr" / f"{kidneyus.case_id(name.removesuffix('.png'))}.png"))
        assert np.array_equal(label, release["masks"][name][2]["regions"])
        assert not np.array_equal(label, release["masks"][name][1]["regions"]) or not label.any()
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {
        "background": 0, "central_echo_complex": 1, "medulla": 2, "cortex": 3}


@pytest.mark.parametrize("task, annotator, dropped", [
    ("capsule", 1, ["299_IM-0068-0001"]),
    ("regions", 1, ["12_IM-0464-17664", "299_IM-0068-0001"]),
    ("regions", 2, ["299_IM-0068-0001"]),
])
def test_drop_empty(release: dict, tmp_path: Path, task: str, annotator: int, dropped: list[str]):
    with pytest.warns(ConversionWarning) as caught:
        folder = kidneyus.convert_kidneyus(release["root"], 531, tmp_path, task=task, annotator=annotator,
                                           drop_empty=True)
    reported = sorted(re.search(r"([^/\s]+)_anon\.png is empty: dropped", str(w.message)).group(1)
                      for w in caught if "is empty" in str(w.message))
    assert reported == dropped
    cases = {p.name.removesuffix(".png") for p in (folder / "labelsTr").iterdir()}
    assert len(cases) == 11 - len(dropped) and not cases & {kidneyus.case_id(d) for d in dropped}


def test_command_line_reports_duplicates(release: dict, tmp_path: Path, capsys):
    kidneyus.main([str(release["root"]), "-d", "531", "-o", str(tmp_path), "--task", "regions", "--annotator", "2"])
    captured = capsys.readouterr()
    assert "WARNING: DICOM id IM-0026-0001 appears as 3 files" in captured.err
    assert "Converted 11 training and 0 test cases" in captured.out


def break_no_mask(root: Path) -> None:
    mask(root, "10_IM-0415-0078_anon.png").unlink()


def break_no_image(root: Path) -> None:
    (root / "images" / "1_IM-0001-0059_anon.png").unlink()


def break_duplicate_without_image(root: Path) -> None:
    (root / "images" / "414_IM-0026-0001_anon.png").unlink()


def break_size(root: Path) -> None:
    path = mask(root, "100_IM-0246-0030_anon.png")
    Image.open(path).resize((33, 21)).save(path)


def break_value(root: Path) -> None:
    path = mask(root, "115_IM-0474-0001-0002_anon.png")
    array = np.asarray(Image.open(path)).copy()
    array[2, 3] = 2
    Image.fromarray(array).save(path)


def break_unreadable(root: Path) -> None:
    path = root / "images" / "130_IM-0650-0033_anon.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def break_colour_mask(root: Path) -> None:
    path = mask(root, "203_IM-0186-0002_anon.png")
    Image.open(path).convert("RGB").save(path)


def break_mask_name(root: Path) -> None:
    shutil.copy(mask(root, "1_IM-0001-0059_anon.png"), mask(root, "mask_of_1.png"))


BAD_INPUTS = {
    "image without mask": (break_no_mask, r"images/10_IM-0415-0078_anon\.png has no mask"),
    "mask without image": (break_no_image, r"capsule/1_IM-0001-0059_anon\.png has no image"),
    "duplicate group without image": (break_duplicate_without_image,
                                      r"402_IM-0026-0001_anon\.png has no image .*DICOM id IM-0026-0001"),
    "mask of another size": (break_size, r"size mismatch: \S+capsule/100_IM-0246-0030_anon\.png is 33x21 "
                                         r"\(width x height\) but its image \S+ is \d+x\d+"),
    "label value out of range": (break_value, r"115_IM-0474-0001-0002_anon\.png has label values \[2\] outside "
                                              r"\[0, 1\]"),
    "unreadable file": (break_unreadable, r"cannot read \S+images/130_IM-0650-0033_anon\.png"),
    "mask with colour channels": (break_colour_mask, r"203_IM-0186-0002_anon\.png has 3 channels"),
    "bad mask name": (break_mask_name, r"mask_of_1\.png is not named like a kidneyUS mask"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(bad: str, release: dict, tmp_path: Path, capsys):
    root = copy_release(release, tmp_path)
    breaker, message = BAD_INPUTS[bad]
    breaker(root)
    output = tmp_path / "raw"
    output.mkdir()
    error = refused(kidneyus.main, [root, "-d", "531", "-o", output], capsys)
    assert "error: " in error and re.search(message, error) and "Traceback" not in error, error
    assert all(line.startswith("WARNING: DICOM id") for line in error[:error.index("error: ")].splitlines())
    assert list(output.iterdir()) == []


@pytest.mark.parametrize("breakers, files", [
    ((break_no_mask, break_mask_name), ("10_IM-0415-0078_anon.png", "mask_of_1.png")),  # found while pairing
    ((break_size, break_value, break_unreadable),  # found while reading every case
     ("100_IM-0246-0030_anon.png", "115_IM-0474-0001-0002_anon.png", "130_IM-0650-0033_anon.png")),
])
@pytest.mark.filterwarnings("ignore::nnunet_ext.dataset_conversion.common.ConversionWarning")
def test_all_problems_are_reported_together(release: dict, tmp_path: Path, breakers: tuple, files: tuple):
    root = copy_release(release, tmp_path)
    for breaker in breakers:
        breaker(root)
    with pytest.raises(ConversionError) as error:
        kidneyus.convert_kidneyus(root, 531, tmp_path / "raw")
    assert str(error.value).startswith(f"{len(files)} problems, nothing was written")
    assert all(name in str(error.value) for name in files)
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_missing_masks_folder(release: dict, tmp_path: Path):
    root = copy_release(release, tmp_path)
    shutil.rmtree(root / "labels" / "reviewed_masks_2")
    with pytest.raises(ConversionError, match=r"no reviewed_masks_2/capsule folder under \S+kidneyUS"):
        kidneyus.convert_kidneyus(root, 531, tmp_path / "raw", annotator=2)


def test_existing_dataset_is_kept_without_overwrite(release: dict, tmp_path: Path, capsys):
    kidneyus.main([str(release["root"]), "-d", "531", "-o", str(tmp_path)])
    folder = tmp_path / DATASET
    before = files_of(folder)
    error = refused(kidneyus.main, [release["root"], "-d", "531", "-o", tmp_path, "--task", "regions"], capsys)
    assert f"error: {folder} already exists; pass --overwrite" in error
    assert files_of(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]  # no temporary sibling left
    kidneyus.main([str(release["root"]), "-d", "531", "-o", str(tmp_path), "--task", "regions", "--overwrite"])
    assert json.loads((folder / "dataset.json").read_text())["labels"]["cortex"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]


def test_dry_run_writes_nothing(release: dict, tmp_path: Path, capsys):
    kidneyus.main([str(release["root"]), "-d", "531", "-o", str(tmp_path), "--dry-run", "--drop-empty"])
    assert "Dry run: all 10 cases are valid" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_planned_by_nnunet(planned_dataset):
    """``nnUNetv2_plan_and_preprocess -c 2d --verify_dataset_integrity`` accepts the converted twin."""
    dataset = planned_dataset("kidneyus")
    plans = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["spacing"] == [1.0, 1.0]
    assert json.loads((dataset.preprocessed / "dataset.json").read_text())["numTraining"] == 11
    cases = sorted(p.name for p in (dataset.preprocessed / "gt_segmentations").iterdir())
    assert len(cases) == 11 and "kidneyus_414_IM-0026-0001.png" in cases
