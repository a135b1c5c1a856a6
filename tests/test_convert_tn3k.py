"""TN3K converter (``nnunet_ext.dataset_conversion.tn3k``): JPEG masks, index folds -> nnU-Net's split, bad inputs."""
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

from nnunet_ext.dataset_conversion import tn3k
from nnunet_ext.dataset_conversion.common import ConversionError
from nnunet_ext.synthetic.ultrasound_breast_thyroid import make_synthetic_tn3k
from tests.conversion_checks import refused


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default synthetic TN3K release: trainval 0000-0014, test 0000-0003, five fold files; read-only."""
    return make_synthetic_tn3k(tmp_path_factory.mktemp("tn3k_release"))


@pytest.fixture(scope="module")
def converted(release: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tn3k.convert_tn3k(release["dataset_folder"], 523, tmp_path_factory.mktemp("tn3k_raw"))


def expected_splits(folds: list[dict], numbers: list[int]) -> list[dict]:
    """Hand mapping of the release's index folds to case ids: index i -> the i-th trainval number."""
    return [{key: [f"tn3k_{numbers[i]:04d}" for i in fold[key]] for key in ("train", "val")} for fold in folds]


def copy_release(release: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release["dataset_folder"], tmp_path / tn3k.ROOT_FOLDER))


def test_twin_layout_and_quirks(release: dict):
    root = release["dataset_folder"]
    folders = ["test-image", "test-mask", "trainval-image", "trainval-mask"]
    assert sorted(p.name for p in root.iterdir()) == sorted(folders + [f"tn3k-trainval-fold{k}.json" for k in range(5)])
    assert sorted(p.name for p in (root / "trainval-mask").iterdir()) == [f"{n:04d}.jpg" for n in range(15)]
    mask = np.asarray(Image.open(root / "trainval-mask" / "0003.jpg"))
    assert ((mask > 20) & (mask < 235)).any()  # JPEG artefacts around the edges
    assert Image.open(root / "test-image" / "0001.jpg").mode == "RGB"
    folds = [json.loads((root / f"tn3k-trainval-fold{k}.json").read_text()) for k in range(5)]
    assert sorted(i for fold in folds for i in fold["val"]) == list(range(15))  # a partition, by index
    assert all(sorted(fold["train"] + fold["val"]) == list(range(15)) for fold in folds)


def test_converted_images_labels_and_test_set(release: dict, converted: Path):
    root = release["dataset_folder"]
    assert sorted(p.name for p in (converted / "imagesTr").iterdir()) == [f"tn3k_{n:04d}_0000.png" for n in range(15)]
    assert sorted(p.name for p in (converted / "imagesTs").iterdir()) == [f"tn3k_test_{n:04d}_0000.png"
                                                                          for n in range(4)]
    assert sorted(p.name for p in (converted / "labelsTs").iterdir()) == [f"tn3k_test_{n:04d}.png" for n in range(4)]
    for subset, prefix, count in (("trainval", "tn3k_", 15), ("test", "tn3k_test_", 4)):
        images, labels = ("imagesTr", "labelsTr") if subset == "trainval" else ("imagesTs", "labelsTs")
        for n in range(count):
            image = Image.open(converted / images / f"{prefix}{n:04d}_0000.png")
            assert image.mode == "L"
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(root / f"{subset}-image" / f"{n:04d}.jpg")
                                                                .convert("L")))
            label = np.asarray(Image.open(converted / labels / f"{prefix}{n:04d}.png"))
            jpeg_mask = np.asarray(Image.open(root / f"{subset}-mask" / f"{n:04d}.jpg").convert("L"))
            assert np.array_equal(label, (jpeg_mask >= 128).astype(np.uint8)) and label.sum() > 0
    info = json.loads((converted / "dataset.json").read_text())
    assert (info["numTraining"], info["labels"]) == (15, {"background": 0, "nodule": 1})


def test_folds_become_splits_final(release: dict, converted: Path):
    splits = json.loads((converted / "splits_final.json").read_text())
    assert splits == expected_splits(release["folds"], list(range(15)))
    assert len(splits) == 5 and splits[0]["val"] == [f"tn3k_{i:04d}" for i in release["folds"][0]["val"]]


def test_indices_count_in_the_numerically_sorted_list(release: dict, tmp_path: Path):
    """With image 0003 missing, index 3 is image 0004: indices are positions in the sorted list, not numbers."""
    root = copy_release(release, tmp_path)
    (root / "trainval-image" / "0003.jpg").unlink()
    (root / "trainval-mask" / "0003.jpg").unlink()
    numbers = [n for n in range(15) if n != 3]
    folds = [{"train": [i for i in range(14) if i % 5 != k], "val": [i for i in range(14) if i % 5 == k]}
             for k in range(5)]
    for k, fold in enumerate(folds):
        (root / f"tn3k-trainval-fold{k}.json").write_text(json.dumps(fold))
    folder = tn3k.convert_tn3k(root, 523, tmp_path / "raw")
    splits = json.loads((folder / "splits_final.json").read_text())
    assert splits == expected_splits(folds, numbers)
    assert splits[3]["val"] == ["tn3k_0004", "tn3k_0009", "tn3k_0014"]  # indices 3, 8, 13


def edit_fold(root: Path, fold: int, **entries) -> None:
    path = root / f"tn3k-trainval-fold{fold}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))


def break_unknown_index(root: Path) -> None:
    fold = json.loads((root / "tn3k-trainval-fold2.json").read_text())
    edit_fold(root, 2, val=fold["val"] + [15])


def break_string_index(root: Path) -> None:
    edit_fold(root, 4, train=["0001", 2])


def break_fold_keys(root: Path) -> None:
    (root / "tn3k-trainval-fold3.json").write_text(json.dumps({"training": [0, 1], "val": [2]}))


def break_no_mask(root: Path) -> None:
    (root / "trainval-mask" / "0006.jpg").unlink()


def break_no_image(root: Path) -> None:
    (root / "test-image" / "0002.jpg").unlink()


def break_size(root: Path) -> None:
    Image.open(root / "test-mask" / "0001.jpg").resize((33, 21)).save(root / "test-mask" / "0001.jpg")


def break_unreadable(root: Path) -> None:
    path = root / "trainval-image" / "0009.jpg"
    path.write_bytes(path.read_bytes()[:200])


def break_missing_fold(root: Path) -> None:
    (root / "tn3k-trainval-fold1.json").unlink()


def break_fold_overlap(root: Path) -> None:
    fold = json.loads((root / "tn3k-trainval-fold0.json").read_text())
    edit_fold(root, 0, train=fold["train"] + fold["val"][:1])


def break_name(root: Path) -> None:
    shutil.copy(root / "trainval-image" / "0001.jpg", root / "trainval-image" / "0001 (copy).jpg")


BAD_INPUTS = {
    "unknown fold index": (break_unknown_index, r"fold2\.json: unknown val indices \[15\] \(indices into the 15 "
                                                r"numerically sorted trainval images, 0\.\.14\)"),
    "fold index not an integer": (break_string_index, r"fold4\.json: unknown train indices \['0001'\]"),
    "fold file without train and val": (break_fold_keys, r"fold3\.json must hold \{\"train\": \[indices\], "
                                                         r"\"val\": \[indices\]\}, got the keys \['training', 'val'\]"),
    "image without mask": (break_no_mask, r"trainval-image/0006\.jpg has no mask trainval-mask/0006\.jpg"),
    "mask without image": (break_no_image, r"test-mask/0002\.jpg has no image test-image/0002\.jpg"),
    "mask of another size": (break_size, r"size mismatch: \S+test-mask/0001\.jpg is 33x21"),
    "unreadable file": (break_unreadable, r"cannot read \S+trainval-image/0009\.jpg"),
    "missing fold file": (break_missing_fold, r"fold file \S+tn3k-trainval-fold1\.json is missing"),
    "case in train and val": (break_fold_overlap, r"fold0\.json has cases in both train and val: \['tn3k_"),
    "bad file name": (break_name, r"0001 \(copy\)\.jpg is not named like a TN3K file"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(bad: str, release: dict, tmp_path: Path, capsys):
    root = copy_release(release, tmp_path)
    breaker, message = BAD_INPUTS[bad]
    breaker(root)
    output = tmp_path / "raw"
    output.mkdir()
    error = refused(tn3k.main, [root, "-d", "523", "-o", output], capsys)
    assert error.startswith("error: ") and re.search(message, error), error
    assert list(output.iterdir()) == []


def test_existing_dataset_is_kept_without_overwrite(release: dict, converted: Path):
    before = {p: p.read_bytes() for p in converted.rglob("*") if p.is_file()}
    with pytest.raises(ConversionError, match="Dataset523_TN3K already exists; pass --overwrite"):
        tn3k.convert_tn3k(release["dataset_folder"], 523, converted.parent)
    assert {p: p.read_bytes() for p in converted.rglob("*") if p.is_file()} == before
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]


def test_sigint_while_writing_leaves_nothing(tmp_path: Path):
    """SIGINT after the first converted case: exit 130, no dataset, no temporary folder, existing data untouched."""
    release = make_synthetic_tn3k(tmp_path / "release", num_trainval=200, num_test=0)
    output = tmp_path / "raw"
    (output / "Dataset099_Other").mkdir(parents=True)
    (output / "Dataset099_Other" / "keep.txt").write_text("untouched")
    process = subprocess.Popen([sys.executable, "-m", "nnunet_ext.dataset_conversion.tn3k",
                                str(release["dataset_folder"]), "-d", "523", "-o", str(output)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = process.stdout.readline()
    assert first.startswith("[1/200] "), first + process.stderr.read()
    assert any(p.name.startswith(".Dataset523_TN3K.partial-") for p in output.iterdir())  # writing has begun
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "interrupted by SIGINT" in stderr and "Converted" not in stdout
    assert sorted(p.name for p in output.iterdir()) == ["Dataset099_Other"]
    assert (output / "Dataset099_Other" / "keep.txt").read_text() == "untouched"


SPLIT_OF_FOLD = """
import json, sys, torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
folder, fold = sys.argv[1], int(sys.argv[2])
plans = {**load_json(folder + "/nnUNetPlans.json"), "continue_training": False}  # as nnUNetv2_train passes it
trainer = nnUNetTrainer(plans, "2d", fold, load_json(folder + "/dataset.json"), device=torch.device("cpu"))
train, val = trainer.do_split()
print(json.dumps({"train": sorted(train), "val": sorted(val)}))
"""


def test_nnunet_trains_with_the_release_folds(planned_dataset, release: dict):
    """After planning, nnUNet_preprocessed holds our split and nnU-Net's own ``do_split`` returns it per fold."""
    dataset = planned_dataset("tn3k")
    expected = expected_splits(release["folds"], list(range(15)))  # the fixture's twin uses the same seed 0
    assert json.loads((dataset.preprocessed / "splits_final.json").read_text()) == expected
    for fold in (0, 3):
        result = dataset.run(sys.executable, "-c", SPLIT_OF_FOLD, dataset.preprocessed, fold)
        split = json.loads(result.stdout.strip().splitlines()[-1])
        assert split == {key: sorted(expected[fold][key]) for key in ("train", "val")}
    assert len(list((dataset.preprocessed / "gt_segmentations").iterdir())) == 15
