"""US simulation converter (``nnunet_ext.dataset_conversion.ussim``) on its synthetic twin: palette matching,
quirks, bad inputs, planning by nnU-Net."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunet_ext.dataset_conversion import ussim
from nnunet_ext.dataset_conversion.common import ConversionError
from nnunet_ext.synthetic.ussim import make_synthetic_ussim
from tests.conversion_checks import files_of, refused

DATASET = "Dataset532_USSim"
LIVER, KIDNEY, PANCREAS, VESSELS, ADRENALS = 1, 2, 3, 4, 5  # organ task labels (1 + index in ORGAN_COLOURS)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default synthetic US simulation release (seed 0); read-only."""
    return make_synthetic_ussim(tmp_path_factory.mktemp("ussim_release"))


@pytest.fixture(scope="module")
def organs(release: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AUS converted with the multi-organ task and two worker processes."""
    return ussim.convert_ussim(release["root"], 532, tmp_path_factory.mktemp("ussim_raw"), task="organs",
                               num_processes=2)


def source(release: dict, subset: str, kind: str, split: str, stem: str) -> Path:
    """The one file of ``stem`` in ``<subset>/<kind>/<split>`` (whatever its extension)."""
    [path] = (release["release"] / subset / kind / split).glob(f"{stem}.*")
    return path


def copy_release(release: dict, tmp_path: Path) -> Path:
    """A private copy of the release; returns its ``AUS`` folder."""
    shutil.copytree(release["root"] / ussim.RELEASE[0], tmp_path / "copy" / ussim.RELEASE[0])
    return tmp_path / "copy" / Path(*ussim.RELEASE) / "AUS"


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_twin_has_the_real_layout_and_quirks(release: dict):
    folder = release["release"]
    assert folder == release["root"] / "abdominal_US" / "abdominal_US"
    assert sorted(p.name for p in (folder / "RUS" / "annotations").iterdir()) == ["test"]  # no RUS train labels
    assert len(release["cases"]["AUS", "train"]) == 10
    quirks = release["quirks"]
    assert source(release, "AUS", "images", "train", quirks["jpg_image"]).suffix == ".jpg"
    assert source(release, "AUS", "annotations", "train", quirks["jpg_image"]).suffix == ".png"
    jpeg = source(release, "AUS", "annotations", "train", quirks["jpeg_annotation"])
    assert jpeg.suffix == ".jpg"
    colours, _, _ = ussim.palette("organs")
    distance = np.linalg.norm(read(jpeg).astype(float)[..., None, :] - colours, axis=-1).min(axis=-1)
    assert 5 < distance.max() < 30 and (distance > 0).mean() > 0.2  # inexact colours, within the tolerance
    assert Image.open(source(release, "AUS", "annotations", "train", quirks["rgba_annotation"])).mode == "RGBA"
    grey = source(release, "AUS", "annotations", "train", quirks["grey_annotation"])
    assert Image.open(grey).mode == "L"
    assert set(np.unique(read(grey))) <= {0, 10, 29, 41, 76, 150, 226, 255}  # luma of the palette colours
    png = read(source(release, "AUS", "annotations", "train", "ct1-3"))
    assert {tuple(c) for c in png.reshape(-1, 3)} >= {(0, 0, 0), (10, 10, 10), (100, 0, 100), (255, 255, 0)}
    image = read(source(release, "AUS", "images", "train", "ct1-3"))
    assert image.shape == (48, 64, 3) and (image == image[..., :1]).all()


def test_liver_is_learnable(release: dict):
    """The liver is much brighter than the other tissue in the scan fan, on every image."""
    for (subset, split, stem), labels in release["labels"].items():
        image = read(source(release, subset, "images", split, stem)).astype(float)[..., 0]
        rest = (labels != LIVER) & (image > 0)
        assert image[labels == LIVER].mean() > 1.5 * image[rest].mean()


def test_palette_matching_by_hand():
    annotation = np.array([[[0, 0, 0], [10, 10, 10], [100, 0, 100], [60, 0, 60]],
                           [[255, 255, 0], [0, 0, 255], [250, 5, 0], [0, 255, 255]]], dtype=np.uint8)
    organs = ussim.colour_labels(annotation, False, "organs", 60.0, Path("a.png"))
    assert organs.tolist() == [[0, 0, LIVER, LIVER], [KIDNEY, PANCREAS, VESSELS, ADRENALS]]
    liver = ussim.colour_labels(annotation, False, "liver", 60.0, Path("a.png"))
    assert liver.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    swapped = ussim.colour_labels(np.ascontiguousarray(annotation[..., ::-1]), False, "organs", 60.0, Path("a.png"))
    assert swapped[1].tolist() == [ADRENALS, VESSELS, PANCREAS, KIDNEY]  # what a BGR reader would produce
    grey = np.array([[0, 10, 41, 29], [226, 76, 255, 43]], dtype=np.uint8)
    assert ussim.colour_labels(grey, True, "organs", 60.0, Path("g.png")).tolist() == [[0, 0, LIVER, PANCREAS],
                                                                                      [KIDNEY, VESSELS, 7, LIVER]]


def test_off_palette_colour_names_the_file_colour_and_place():
    annotation = np.zeros((4, 5, 3), dtype=np.uint8)
    annotation[2, 3] = annotation[3, 1] = (128, 128, 0)  # 164.8 from liver, 167.2 from (10, 10, 10)
    with pytest.raises(ConversionError, match=r"^a\.png has 1 colour\(s\) beyond the tolerance 60: colour "
                                              r"\(128, 128, 0\) \(2 pixels, e\.g\. row 2 column 3\) is 164\.8 from the "
                                              r"nearest palette colour, liver; raise --tolerance"):
        ussim.colour_labels(annotation, False, "organs", 60.0, Path("a.png"))
    assert ussim.colour_labels(annotation, False, "organs", 170.0, Path("a.png"))[2, 3] == LIVER  # nearest wins
    with pytest.raises(ConversionError, match=r"g\.png has 1 colour\(s\) beyond the tolerance 5: grey value 35"):
        ussim.colour_labels(np.full((2, 2), 35, dtype=np.uint8), True, "liver", 60.0, Path("g.png"))


def test_aus_organs_every_quirk_converts_exactly(release: dict, organs: Path):
    train, test = release["cases"]["AUS", "train"], release["cases"]["AUS", "test"]
    assert sorted(p.name for p in (organs / "labelsTr").iterdir()) == sorted(f"aus_train_{s}.png" for s in train)
    assert sorted(p.name for p in (organs / "imagesTs").iterdir()) == sorted(f"aus_test_{s}_0000.png" for s in test)
    assert sorted(p.name for p in (organs / "labelsTs").iterdir()) == sorted(f"aus_test_{s}.png" for s in test)
    for split, stems in (("train", train), ("test", test)):
        for stem in stems:
            case = ussim.case_id("AUS", split, stem)
            label = read(organs / f"labels{'Tr' if split == 'train' else 'Ts'}" / f"{case}.png")
            assert label.dtype == np.uint8 and np.array_equal(label, release["labels"]["AUS", split, stem]), case
            written = Image.open(organs / f"images{'Tr' if split == 'train' else 'Ts'}" / f"{case}_0000.png")
            assert written.mode == "L"
            assert np.array_equal(np.asarray(written), read(source(release, "AUS", "images", split, stem))[..., 0])
    kidney = release["labels"]["AUS", "train", "ct1-3"] == KIDNEY
    assert kidney.any() and (read(organs / "labelsTr" / "aus_train_ct1-3.png")[kidney] == KIDNEY).all()  # not BGR
    info = json.loads((organs / "dataset.json").read_text())
    assert info["numTraining"] == 10 and info["labels"] == {"background": 0, **{
        organ: k + 1 for k, organ in enumerate(ussim.ORGAN_COLOURS)}}


def test_liver_task_and_rus_subset(release: dict, tmp_path: Path):
    folder = ussim.convert_ussim(release["release"], 532, tmp_path / "aus")
    for stem in release["cases"]["AUS", "train"]:
        label = read(folder / "labelsTr" / f"aus_train_{stem}.png")
        assert np.array_equal(label, (release["labels"]["AUS", "train", stem] == LIVER).astype(np.uint8))
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1}
    rus = ussim.convert_ussim(release["root"], 533, tmp_path / "rus", "RUS", subset="RUS", rgb=True)
    assert sorted(p.name for p in (rus / "labelsTr").iterdir()) == ["rus_test_us001.png", "rus_test_us002.png",
                                                                    "rus_test_us003.png"]
    assert sorted(p.name for p in (rus / "imagesTs").iterdir()) == [
        f"rus_train_us00{n}_000{c}.png" for n in (1, 2) for c in (0, 1, 2)]  # --rgb: R, G, B as three channels
    assert not (rus / "labelsTs").exists()
    assert json.loads((rus / "dataset.json").read_text())["channel_names"] == {"0": "R", "1": "G", "2": "B"}


def break_no_annotation(aus: Path) -> None:
    (aus / "annotations" / "train" / "ct2-17.png").unlink()


def break_no_image(aus: Path) -> None:
    (aus / "images" / "test" / "ct1-3.png").unlink()


def break_size(aus: Path) -> None:
    path = aus / "annotations" / "train" / "ct3-3.png"
    Image.open(path).resize((40, 30), Image.NEAREST).save(path)


def break_colour(aus: Path) -> None:
    path = aus / "annotations" / "train" / "ct3-10.png"
    array = read(path).copy()
    array[20:23, 30:32] = (200, 120, 40)
    Image.fromarray(array).save(path)


def break_grey_value(aus: Path) -> None:
    path = aus / "annotations" / "train" / "ct2-10.png"  # the grey annotation
    array = read(path).copy()
    array[5, 6] = 130
    Image.fromarray(array).save(path)


def break_unreadable(aus: Path) -> None:
    path = aus / "annotations" / "test" / "ct1-10.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def break_duplicate_stem(aus: Path) -> None:
    shutil.copy(aus / "images" / "train" / "ct4-3.png", aus / "images" / "train" / "ct4-3.jpg")


def break_missing_annotations(aus: Path) -> None:
    shutil.rmtree(aus / "annotations" / "test")


BAD_INPUTS = {
    "image without annotation": (break_no_annotation, r"images/train/ct2-17\.png has no annotation ct2-17\.\*"),
    "annotation without image": (break_no_image, r"annotations/test/ct1-3\.png has no image ct1-3\.\*"),
    "annotation of another size": (break_size, r"size mismatch: \S+annotations/train/ct3-3\.png is 40x30 \(width x "
                                               r"height\) but its image \S+ct3-3\.png is 64x48"),
    "off-palette colour": (break_colour, r"train/ct3-10\.png has 1 colour\(s\) beyond the tolerance 60: colour "
                                         r"\(200, 120, 40\) \(6 pixels, e\.g\. row 20 column 30\)"),
    "grey value out of range": (break_grey_value, r"train/ct2-10\.png has 1 colour\(s\) beyond the tolerance 5: "
                                                  r"grey value 130"),
    "unreadable file": (break_unreadable, r"cannot read \S+annotations/test/ct1-10\.png"),
    "two images with one stem": (break_duplicate_stem, r"duplicate image stem ct4-3"),
    "missing annotations folder": (break_missing_annotations, r"AUS/annotations/test is missing"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(bad: str, release: dict, tmp_path: Path, capsys):
    aus = copy_release(release, tmp_path)
    breaker, message = BAD_INPUTS[bad]
    breaker(aus)
    output = tmp_path / "raw"
    output.mkdir()
    error = refused(ussim.main, [tmp_path / "copy", "-d", "532", "-o", output, "--task", "organs"], capsys)
    assert error.startswith("error: ") and re.search(message, error) and "Traceback" not in error, error
    assert list(output.iterdir()) == []


def test_sigint_while_writing_leaves_nothing(tmp_path: Path):
    """SIGINT after the first converted case: exit 130, no dataset, no temporary folder, other data untouched."""
    release = make_synthetic_ussim(tmp_path / "release", num_train=150)
    output = tmp_path / "raw"
    (output / "Dataset099_Other").mkdir(parents=True)
    (output / "Dataset099_Other" / "keep.txt").write_text("untouched")
    process = subprocess.Popen([sys.executable, "-m", "nnunet_ext.dataset_conversion.ussim", str(release["root"]),
                                "-d", "532", "-o", str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = process.stdout.readline()
    assert first.startswith("[1/152] "), first + process.stderr.read()
    assert any(p.name.startswith(".Dataset532_USSim.partial-") for p in output.iterdir())  # writing has begun
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "interrupted by SIGINT" in stderr and "Converted" not in stdout
    assert sorted(p.name for p in output.iterdir()) == ["Dataset099_Other"]
    assert (output / "Dataset099_Other" / "keep.txt").read_text() == "untouched"


def test_tolerance_is_enforced_on_jpeg_annotations(release: dict, tmp_path: Path):
    jpeg = release["quirks"]["jpeg_annotation"]
    with pytest.raises(ConversionError, match=rf"annotations/train/{jpeg}\.jpg has \d+ colour\(s\) beyond the "
                                              r"tolerance 10: colour"):
        ussim.convert_ussim(release["root"], 532, tmp_path, tolerance=10.0)
    assert list(tmp_path.iterdir()) == []


def test_all_problems_are_reported_together(release: dict, tmp_path: Path):
    aus = copy_release(release, tmp_path)
    for breaker in (break_size, break_colour, break_unreadable):
        breaker(aus)
    with pytest.raises(ConversionError, match=r"^3 problems, nothing was written") as error:
        ussim.convert_ussim(tmp_path / "copy", 532, tmp_path / "raw")
    assert all(name in str(error.value) for name in ("ct3-3.png", "ct3-10.png", "ct1-10.png"))
    assert list((tmp_path / "raw").iterdir()) == []  # no dataset, no temporary folder


def test_existing_dataset_is_kept_without_overwrite(release: dict, tmp_path: Path, capsys):
    ussim.main([str(release["root"]), "-d", "532", "-o", str(tmp_path)])
    folder = tmp_path / DATASET
    before = files_of(folder)
    error = refused(ussim.main, [release["root"], "-d", "532", "-o", tmp_path, "--task", "organs"], capsys)
    assert f"error: {folder} already exists; pass --overwrite" in error
    assert files_of(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]
    ussim.main([str(release["root"]), "-d", "532", "-o", str(tmp_path), "--task", "organs", "--overwrite"])
    assert json.loads((folder / "dataset.json").read_text())["labels"]["spleen"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]


def test_dry_run_writes_nothing(release: dict, tmp_path: Path, capsys):
    ussim.main([str(release["root"]), "-d", "532", "-o", str(tmp_path), "--dry-run", "--subset", "RUS"])
    assert "Dry run: all 5 cases are valid; would write 3 training and 2 test cases" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_planned_by_nnunet(planned_dataset):
    """``nnUNetv2_plan_and_preprocess -c 2d --verify_dataset_integrity`` accepts the converted liver twin (the
    SPA-DCN-Net end-to-end dataset: 10 learnable training cases)."""
    dataset = planned_dataset("ussim")
    plans = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["spacing"] == [1.0, 1.0]
    assert plans["configurations"]["2d"]["patch_size"] == [48, 64]
    info = json.loads((dataset.preprocessed / "dataset.json").read_text())
    assert info["numTraining"] == 10 and info["labels"] == {"background": 0, "liver": 1}
    cases = sorted(p.name for p in (dataset.preprocessed / "gt_segmentations").iterdir())
    assert len(cases) == 10 and cases[0] == "aus_train_ct1-10.png"
