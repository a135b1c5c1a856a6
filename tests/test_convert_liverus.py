"""Annotated liver US converter (``nnunet_ext.dataset_conversion.liverus``) on its synthetic twin: discovery,
rasterisation, quirks, bad inputs, planning by nnU-Net."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunet_ext.dataset_conversion import liverus
from nnunet_ext.dataset_conversion.common import ConversionError, ConversionWarning
from nnunet_ext.synthetic.liverus import make_synthetic_liverus
from tests.conversion_checks import files_of, refused

DATASET = "Dataset533_LiverUS"
IGNORE_NOTES = "ignore::nnunet_ext.dataset_conversion.common.ConversionWarning"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default synthetic liver US release (seed 0); read-only."""
    return make_synthetic_liverus(tmp_path_factory.mktemp("liverus_release"))


def polygon(release: dict, class_name: str, kind: str, number: int) -> Path:
    return release["class_folders"][class_name] / "segmentation" / kind / f"{number}.json"


def copy_release(release: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release["root"], tmp_path / "AUL"))


def converted_ids(release: dict, task: str) -> dict[str, np.ndarray]:
    """Case id -> expected label map of every image that has a liver polygon (in ``liver`` or, for 229, ``outline``)."""
    return {liverus.case_id(c, str(n)): labels[task] for (c, n), labels in release["labels"].items()
            if (c, n) != release["no_liver"]}


def test_twin_has_the_real_layout_and_quirks(release: dict):
    root = release["root"]
    assert sorted(p.name for p in root.iterdir()) == ["Benign", "Malignant", "Normal"]
    assert (root / "Malignant" / "Malignant" / "image").is_dir() and (root / "Benign" / "image").is_dir()
    assert all(1 in numbers and 2 in numbers for numbers in release["numbers"].values())  # numbers collide
    assert not (release["class_folders"]["Normal"] / "segmentation" / "mass").exists()
    assert not polygon(release, "Malignant", "liver", 229).exists() and polygon(release, "Malignant", "outline", 229)
    assert not polygon(release, "Malignant", "liver", 374).exists()
    assert polygon(release, "Malignant", "mass", 374).exists()
    points = json.loads(polygon(release, "Benign", "liver", 2).read_text())
    assert isinstance(points, list) and all(len(p) == 2 and isinstance(p[0], float) for p in points)
    image = Image.open(release["class_folders"]["Benign"] / "image" / "3.jpg")
    assert image.format == "JPEG" and image.mode == "RGB"
    assert len(set(release["shapes"].values())) >= 3
    fan = np.array(json.loads(polygon(release, "Benign", "outline", 1).read_text()))
    rows, cols = release["shapes"]["Benign", 1]
    assert np.ptp(fan[:, 0]) > 0.8 * cols and np.ptp(fan[:, 1]) > 0.8 * rows  # outline: the scan fan


def test_liver_and_masses_are_learnable(release: dict):
    """Liver brighter than the tissue around it; benign masses brighter, malignant masses darker than the liver."""
    for (class_name, number), labels in release["labels"].items():
        grey = np.asarray(Image.open(release["class_folders"][class_name] / "image" / f"{number}.jpg").convert("L"))
        grey = grey.astype(float)
        map_ = labels["liver_mass"]
        liver, rest = grey[map_ == 1].mean(), grey[(map_ == 0) & (grey > 0)].mean()
        assert liver > 1.3 * rest
        if class_name != "Normal":
            assert (grey[map_ == 2].mean() > liver) == (class_name == "Benign")


def test_rasterisation_by_hand(tmp_path: Path):
    square = np.array([[1.0, 1.0], [4.0, 1.0], [4.0, 3.0], [1.0, 3.0]])
    mass = np.array([[3.0, 2.0], [5.0, 2.0], [5.0, 4.0], [3.0, 4.0]])
    label = liverus.rasterise([(square, 1), (mass, 2)], (6, 7), [Path("l.json"), Path("m.json")], Path("i.jpg"))
    expected = np.zeros((6, 7), dtype=np.uint8)
    expected[1:4, 1:5] = 1  # pixels inside or on the polygon
    expected[2:5, 3:6] = 2  # the mass painted over the liver
    assert np.array_equal(label, expected)
    files = [Path("l.json"), Path("m.json")]
    with pytest.raises(ConversionError, match=r"size mismatch: m\.json has the point \(18, 2\) outside its image "
                                              r"i\.jpg of 7x6"):
        liverus.rasterise([(square, 1), (mass * [6, 1], 2)], (6, 7), files, Path("i.jpg"))
    edge = np.array([[-2.0, 0.0], [8.0, 0.0], [8.0, 7.0]])  # 2 px beyond the border: a click at the edge, clipped
    assert liverus.rasterise([(edge, 1)], (6, 7), files[:1], Path("i.jpg"))[0].tolist() == [1] * 7
    path = tmp_path / "p.json"
    path.write_text("[[1, 2], [3.5, 4], [0, 0]]")
    assert liverus.read_polygon(path).tolist() == [[1.0, 2.0], [3.5, 4.0], [0.0, 0.0]]


def test_liver_task_ids_notes_and_labels(release: dict, tmp_path: Path):
    with pytest.warns(ConversionWarning) as caught:
        folder = liverus.convert_liverus(release["root"], 533, tmp_path, num_processes=2)
    notes = [str(w.message) for w in caught]
    assert len(notes) == 2
    assert re.fullmatch(r"\S+/Malignant/Malignant/image/229\.jpg: no liver polygon; using \S+/outline/229\.json as "
                        r"the liver \(the liver polygon was saved as outline\)", notes[0]), notes[0]
    assert re.fullmatch(r"\S+/Malignant/Malignant/image/374\.jpg has no liver polygon \(\S+/liver/374\.json\): "
                        r"skipped", notes[1]), notes[1]
    expected = converted_ids(release, "liver")
    assert sorted(expected) == ["benign_0001", "benign_0002", "benign_0003", "malignant_0001", "malignant_0002",
                                "malignant_0229", "normal_0001", "normal_0002"]
    assert sorted(p.name.removesuffix(".png") for p in (folder / "labelsTr").iterdir()) == sorted(expected)
    for case, label in expected.items():
        written = np.asarray(Image.open(folder / "labelsTr" / f"{case}.png"))
        assert np.array_equal(written, label), case
        image = Image.open(folder / "imagesTr" / f"{case}_0000.png")
        class_name, number = case.split("_")
        source = release["class_folders"][class_name.capitalize()] / "image" / f"{int(number)}.jpg"
        assert image.mode == "L" and np.array_equal(np.asarray(image), np.asarray(Image.open(source))[..., 0])
    info = json.loads((folder / "dataset.json").read_text())
    assert (info["numTraining"], info["labels"]) == (8, {"background": 0, "liver": 1})


@pytest.mark.filterwarnings(IGNORE_NOTES)
def test_liver_mass_task_paints_the_mass_over_the_liver(release: dict, tmp_path: Path):
    folder = liverus.convert_liverus(release["root"], 533, tmp_path, task="liver_mass")
    for case, label in converted_ids(release, "liver_mass").items():
        written = np.asarray(Image.open(folder / "labelsTr" / f"{case}.png"))
        assert np.array_equal(written, label), case
        assert (2 in written) == (not case.startswith("normal"))
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1, "mass": 2}


def test_liver_in_outline_list_can_be_emptied(release: dict, tmp_path: Path, capsys):
    liverus.main([str(release["root"]), "-d", "533", "-o", str(tmp_path), "--liver-in-outline"])
    captured = capsys.readouterr()
    assert re.search(r"WARNING: \S+/229\.jpg has no liver polygon .*: skipped", captured.err)
    assert "Converted 7 training and 0 test cases" in captured.out
    assert not (tmp_path / DATASET / "labelsTr" / "malignant_0229.png").exists()
    with pytest.raises(ConversionError, match=r"--liver-in-outline takes CLASS/N .* got \['malignant/229'\]"):
        liverus.convert_liverus(release["root"], 533, tmp_path, liver_in_outline=("malignant/229",))


def break_polygon_without_image(root: Path) -> None:
    folder = root / "Benign" / "segmentation" / "liver"
    shutil.copy(folder / "1.json", folder / "9.json")


def break_size(root: Path) -> None:
    path = root / "Normal" / "segmentation" / "liver" / "2.json"
    path.write_text(json.dumps((np.array(json.loads(path.read_text())) * 3).tolist()))


def break_not_a_polygon(root: Path) -> None:
    (root / "Benign" / "segmentation" / "liver" / "3.json").write_text('{"points": [[1, 2], [3, 4], [5, 6]]}')


def break_unreadable_json(root: Path) -> None:
    path = root / "Malignant" / "Malignant" / "segmentation" / "liver" / "2.json"
    path.write_text(path.read_text()[:40])


def break_unreadable_image(root: Path) -> None:
    path = root / "Benign" / "image" / "2.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def break_class_name(root: Path) -> None:
    shutil.copytree(root / "Normal", root / "Healthy")


def break_two_class_folders(root: Path) -> None:
    shutil.copytree(root / "Benign", root / "Benign" / "Benign")


BAD_INPUTS = {
    "polygon without image": (break_polygon_without_image, r"Benign/segmentation/liver/9\.json has no image 9\.jpg"),
    "polygon of another image size": (break_size, r"size mismatch: \S+Normal/segmentation/liver/2\.json has the "
                                                  r"point \([^)]+\) outside its image \S+Normal/image/2\.jpg"),
    "not a polygon": (break_not_a_polygon, r"liver/3\.json is not a polygon: expected a JSON list of at least three"),
    "unreadable polygon file": (break_unreadable_json, r"cannot read \S+Malignant/segmentation/liver/2\.json"),
    "unreadable image": (break_unreadable_image, r"cannot read \S+Benign/image/2\.jpg"),
    "unknown class folder": (break_class_name, r"Healthy/image is not in a class folder: expected one of Benign, "
                                               r"Malignant, Normal, got 'Healthy'"),
    "two folders of one class": (break_two_class_folders, r"two image folders of class Benign"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(bad: str, release: dict, tmp_path: Path, capsys):
    root = copy_release(release, tmp_path)
    breaker, message = BAD_INPUTS[bad]
    breaker(root)
    output = tmp_path / "raw"
    output.mkdir()
    error = refused(liverus.main, [root, "-d", "533", "-o", output], capsys)
    assert "error: " in error and re.search(message, error) and "Traceback" not in error, error
    assert all(line.startswith("WARNING: ") for line in error[:error.index("error: ")].splitlines())
    assert list(output.iterdir()) == []


@pytest.mark.filterwarnings(IGNORE_NOTES)
def test_all_problems_are_reported_together(release: dict, tmp_path: Path):
    root = copy_release(release, tmp_path)
    for breaker in (break_size, break_not_a_polygon, break_unreadable_image):
        breaker(root)
    with pytest.raises(ConversionError, match=r"^3 problems, nothing was written") as error:
        liverus.convert_liverus(root, 533, tmp_path / "raw")
    assert all(name in str(error.value) for name in ("liver/2.json", "liver/3.json", "image/2.jpg"))
    assert list((tmp_path / "raw").iterdir()) == []


def test_existing_dataset_is_kept_without_overwrite(release: dict, tmp_path: Path, capsys):
    liverus.main([str(release["root"]), "-d", "533", "-o", str(tmp_path)])
    folder = tmp_path / DATASET
    before = files_of(folder)
    error = refused(liverus.main, [release["root"], "-d", "533", "-o", tmp_path, "--task", "liver_mass"], capsys)
    assert f"error: {folder} already exists; pass --overwrite" in error
    assert files_of(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]
    liverus.main([str(release["root"]), "-d", "533", "-o", str(tmp_path), "--task", "liver_mass", "--overwrite"])
    assert json.loads((folder / "dataset.json").read_text())["labels"]["mass"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]


def test_dry_run_writes_nothing(release: dict, tmp_path: Path, capsys):
    liverus.main([str(release["root"]), "-d", "533", "-o", str(tmp_path), "--dry-run"])
    assert "Dry run: all 8 cases are valid" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_planned_by_nnunet(planned_dataset):
    """``nnUNetv2_plan_and_preprocess -c 2d --verify_dataset_integrity`` accepts the converted twin."""
    dataset = planned_dataset("liverus")
    plans = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["spacing"] == [1.0, 1.0]
    assert json.loads((dataset.preprocessed / "dataset.json").read_text())["numTraining"] == 8
    cases = sorted(p.name for p in (dataset.preprocessed / "gt_segmentations").iterdir())
    assert cases == ["benign_0001.png", "benign_0002.png", "benign_0003.png", "malignant_0001.png",
                     "malignant_0002.png", "malignant_0229.png", "normal_0001.png", "normal_0002.png"]
