"""Tests of the LiTS converter (``nnunet_ext.dataset_conversion.lits``) on the synthetic release."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_ext.dataset_conversion.common import ConversionError, ConversionWarning
from nnunet_ext.dataset_conversion.lits import convert_lits

pytestmark = pytest.mark.filterwarnings("ignore::nnunet_ext.dataset_conversion.common.ConversionWarning")

TRAINING_NUMBERS = (0, 1, 2, 3, 8, 9, 10, 11)
BATCH_1, BATCH_2 = "Training Batch 1", "Training Batch 2"


@dataclass(frozen=True)
class Conversion:
    """A finished conversion: dataset folder, emitted geometry warnings and printed lines."""

    folder: Path
    warnings: list[str]
    stdout: str


def source_file(root: Path, kind: str, number: int) -> Path:
    """``volume-N.nii`` / ``segmentation-N.nii`` of the default synthetic release."""
    return root / (BATCH_1 if number < 4 else BATCH_2) / f"{kind}-{number}.nii"


def read_array(path: Path) -> np.ndarray:
    """Voxels of an image file as a numpy (z, y, x) array."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def geometry(path: Path) -> tuple[tuple[float, ...], ...]:
    """(spacing, origin, direction) of an image file."""
    image = sitk.ReadImage(str(path))
    return image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def copy_release(root: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of the synthetic release."""
    return Path(shutil.copytree(root, tmp_path / "lits"))


def rewrite(path: Path, array: np.ndarray | None = None, spacing: tuple[float, ...] | None = None,
            origin: tuple[float, ...] | None = None) -> None:
    """Rewrite an image file with new voxels and/or spacing/origin, keeping everything else."""
    image = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) if array is None else array)
    new.SetSpacing(spacing or image.GetSpacing())
    new.SetOrigin(origin or image.GetOrigin())
    new.SetDirection(image.GetDirection())
    sitk.WriteImage(new, str(path))


def assert_nothing_written(output: Path) -> None:
    """No dataset folder and no leftover temporary folder in ``output``."""
    assert not output.exists() or list(output.iterdir()) == []


def run_console(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``nnunet_ext_convert_lits`` with ``args``."""
    return subprocess.run(["nnunet_ext_convert_lits", *args], capture_output=True, text=True,
                          env=env, check=False)


@pytest.fixture(scope="module")
def converted(synthetic_lits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """The synthetic release converted once, with two worker processes, as Dataset003_LiTS."""
    output = tmp_path_factory.mktemp("nnUNet_raw")
    stdout = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
        warnings.simplefilter("always")
        folder = convert_lits(synthetic_lits_root, 3, output, num_processes=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    return Conversion(folder, messages, stdout.getvalue())


def test_writes_all_cases_under_their_numbers(converted: Conversion) -> None:
    """8 training images and labels, 2 test images, named by the LiTS number, nothing else."""
    assert converted.folder.name == "Dataset003_LiTS"
    assert [p.name for p in converted.folder.parent.iterdir()] == ["Dataset003_LiTS"]
    ids = [f"lits_{n:03d}" for n in TRAINING_NUMBERS]
    assert sorted(p.name for p in (converted.folder / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in ids]
    assert sorted(p.name for p in (converted.folder / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
    assert sorted(p.name for p in (converted.folder / "imagesTs").iterdir()) == [
        "lits_test_000_0000.nii.gz", "lits_test_001_0000.nii.gz"]


def test_images_and_labels_are_paired_by_number(converted: Conversion, synthetic_lits_root: Path) -> None:
    """lits_N holds exactly volume-N and segmentation-N, voxel for voxel, on volume-N's grid."""
    for number in TRAINING_NUMBERS:
        image = converted.folder / "imagesTr" / f"lits_{number:03d}_0000.nii.gz"
        label = converted.folder / "labelsTr" / f"lits_{number:03d}.nii.gz"
        volume = source_file(synthetic_lits_root, "volume", number)
        np.testing.assert_array_equal(read_array(image), read_array(volume))
        np.testing.assert_array_equal(read_array(label), read_array(source_file(synthetic_lits_root,
                                                                                  "segmentation", number)))
        assert sitk.ReadImage(str(label)).GetPixelID() == sitk.sitkUInt8
        assert geometry(image) == geometry(volume) == geometry(label)
    for number in (0, 1):
        test_image = converted.folder / "imagesTs" / f"lits_test_{number:03d}_0000.nii.gz"
        test_volume = synthetic_lits_root / "LITS-Challenge-Test-Data" / f"test-volume-{number}.nii"
        np.testing.assert_array_equal(read_array(test_image), read_array(test_volume))


def test_identity_label_gets_volume_geometry_with_warning(converted: Conversion,
                                                          synthetic_lits_root: Path) -> None:
    """segmentation-11 (identity geometry) now carries volume-11's geometry; one warning names it."""
    spacing, origin, direction = geometry(converted.folder / "labelsTr" / "lits_011.nii.gz")
    volume_spacing, volume_origin, volume_direction = geometry(source_file(synthetic_lits_root, "volume", 11))
    assert spacing == volume_spacing and spacing != (1.0, 1.0, 1.0)
    assert origin == volume_origin and direction == volume_direction
    assert len(converted.warnings) == 1
    assert "lits_011" in converted.warnings[0] and "segmentation-11.nii" in converted.warnings[0]
    assert geometry(converted.folder / "labelsTr" / "lits_008.nii.gz") == ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                                                          (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def test_progress_lines_and_summary(converted: Conversion) -> None:
    """One ``[k/N] source -> case`` line per case in numeric order, then the output path."""
    lines = converted.stdout.splitlines()
    assert lines[:8] == [f"[{k}/10] volume-{n}.nii -> lits_{n:03d}" for k, n in enumerate(TRAINING_NUMBERS, 1)]
    assert lines[8:10] == ["[9/10] test-volume-0.nii -> lits_test_000", "[10/10] test-volume-1.nii -> lits_test_001"]
    assert lines[10] == f"Converted 8 training and 2 test cases to {converted.folder}"
    assert len(lines) == 11


def test_dataset_json(converted: Conversion) -> None:
    """dataset.json made by nnU-Net's generate_dataset_json with the LiTS channels and labels."""
    dataset = json.loads((converted.folder / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert dataset["numTraining"] == 8
    assert dataset["file_ending"] == ".nii.gz"
    assert dataset["name"] == "LiTS"
    assert "LiTS" in dataset["reference"] and "LiTS" in dataset["description"]


def test_nnunet_verify_dataset_integrity_passes(converted: Conversion, capsys: pytest.CaptureFixture) -> None:
    """nnU-Net's own checker accepts the output without errors or geometry warnings."""
    verify_dataset_integrity(str(converted.folder), num_processes=1)
    printed = capsys.readouterr().out
    assert "verify_dataset_integrity Done" in printed
    assert "Warning" not in printed and "Error" not in printed


def test_hidden_and_appledouble_files_are_skipped(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """``._volume-0.nii`` and ``__MACOSX/`` copies (garbage bytes) do not disturb the conversion."""
    root = copy_release(synthetic_lits_root, tmp_path)
    (root / BATCH_1 / "._volume-0.nii").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "__MACOSX" / BATCH_1).mkdir(parents=True)
    (root / "__MACOSX" / BATCH_1 / "segmentation-5.nii").write_bytes(b"garbage")
    folder = convert_lits(root, 3, tmp_path / "out")
    assert len(list((folder / "labelsTr").iterdir())) == 8


def test_missing_segmentation(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """A volume without its segmentation is named; nothing is written."""
    root = copy_release(synthetic_lits_root, tmp_path)
    source_file(root, "segmentation", 10).unlink()
    with pytest.raises(ConversionError, match=r"volume-10\.nii has no segmentation-10"):
        convert_lits(root, 3, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_missing_volume(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """A segmentation without its volume is named; nothing is written."""
    root = copy_release(synthetic_lits_root, tmp_path)
    source_file(root, "volume", 2).unlink()
    with pytest.raises(ConversionError, match=r"segmentation-2\.nii has no volume-2"):
        convert_lits(root, 3, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_duplicate_case_number(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """volume-1 both as .nii and as .nii.gz: both files are named; nothing is written."""
    root = copy_release(synthetic_lits_root, tmp_path)
    sitk.WriteImage(sitk.ReadImage(str(source_file(root, "volume", 1))), str(root / BATCH_2 / "volume-1.nii.gz"))
    duplicate = r"duplicate case number 1: .*volume-1\.nii.* and .*volume-1\.nii\.gz"
    with pytest.raises(ConversionError, match=duplicate):
        convert_lits(root, 3, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_size_mismatch(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """A segmentation two slices short: both files and both sizes are named; nothing is written."""
    root = copy_release(synthetic_lits_root, tmp_path)
    segmentation = source_file(root, "segmentation", 3)
    array = read_array(segmentation)
    rewrite(segmentation, array[:-2])
    x, y, z = array.shape[::-1]
    with pytest.raises(ConversionError) as error:
        convert_lits(root, 3, tmp_path / "out")
    message = str(error.value)
    assert "volume-3.nii" in message and "segmentation-3.nii" in message
    assert f"({x}, {y}, {z})" in message and f"({x}, {y}, {z - 2})" in message
    assert_nothing_written(tmp_path / "out")


def test_spacing_mismatch(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """A label with another (non-identity) spacing is an error naming both files."""
    root = copy_release(synthetic_lits_root, tmp_path)
    segmentation = source_file(root, "segmentation", 2)
    sx, sy, sz = sitk.ReadImage(str(segmentation)).GetSpacing()
    rewrite(segmentation, spacing=(sx, sy, sz + 0.5))
    with pytest.raises(ConversionError, match=r"spacing mismatch: .*volume-2\.nii.*segmentation-2\.nii"):
        convert_lits(root, 3, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_origin_mismatch_is_fixed_with_warning(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """A shifted label origin gets the volume origin and a warning naming the case."""
    root = copy_release(synthetic_lits_root, tmp_path)
    segmentation = source_file(root, "segmentation", 2)
    ox, oy, oz = sitk.ReadImage(str(segmentation)).GetOrigin()
    rewrite(segmentation, origin=(ox + 5.0, oy, oz))
    with pytest.warns(ConversionWarning, match=r"lits_002: origin/direction of .*segmentation-2\.nii"):
        folder = convert_lits(root, 3, tmp_path / "out")
    assert geometry(folder / "labelsTr" / "lits_002.nii.gz") == geometry(source_file(root, "volume", 2))


def test_unreadable_file(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """Garbage bytes in volume-1.nii: the file and SimpleITK's message are named; nothing is written."""
    root = copy_release(synthetic_lits_root, tmp_path)
    source_file(root, "volume", 1).write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ConversionError, match=r"cannot read .*volume-1\.nii: Unable to determine ImageIO reader"):
        convert_lits(root, 3, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_label_value_3(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """A label value 3 is named with its file; no dataset and no temporary folder remain."""
    root = copy_release(synthetic_lits_root, tmp_path)
    segmentation = source_file(root, "segmentation", 9)
    array = read_array(segmentation)
    array[array.shape[0] // 2, 3:6, 3:6] = 3
    rewrite(segmentation, array)
    with pytest.raises(ConversionError, match=r"segmentation-9\.nii has label values \[3\]"):
        convert_lits(root, 3, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_failed_overwrite_leaves_existing_dataset_untouched(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """--overwrite with a bad label (found mid-conversion) keeps the previous dataset as it was."""
    root = copy_release(synthetic_lits_root, tmp_path)
    folder = convert_lits(root, 3, tmp_path / "out")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    segmentation = source_file(root, "segmentation", 11)
    rewrite(segmentation, np.full_like(read_array(segmentation), 7))
    with pytest.raises(ConversionError, match=r"segmentation-11\.nii has label values \[7\]"):
        convert_lits(root, 3, tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["Dataset003_LiTS"]
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_existing_dataset_refused_then_replaced(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """An existing Dataset003_LiTS is kept without overwrite and replaced completely with it."""
    target = tmp_path / "out" / "Dataset003_LiTS"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("previous content")
    with pytest.raises(ConversionError, match=r"Dataset003_LiTS already exists; pass --overwrite"):
        convert_lits(synthetic_lits_root, 3, tmp_path / "out")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert (target / "old.txt").read_text() == "previous content"
    assert convert_lits(synthetic_lits_root, 3, tmp_path / "out", overwrite=True) == target
    assert sorted(p.name for p in target.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]
    assert len(list((target / "labelsTr").iterdir())) == 8
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["Dataset003_LiTS"]


def test_other_dataset_with_same_id(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """Dataset003_Other in the output folder blocks id 3 (nnU-Net could not resolve it)."""
    (tmp_path / "out" / "Dataset003_Other").mkdir(parents=True)
    with pytest.raises(ConversionError, match=r"Dataset003_Other already uses dataset id 3"):
        convert_lits(synthetic_lits_root, 3, tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["Dataset003_Other"]


def test_console_error_exit_status(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """The console command reports a missing segmentation as one ``error:`` line and exits 1."""
    root = copy_release(synthetic_lits_root, tmp_path)
    source_file(root, "segmentation", 0).unlink()
    result = run_console(str(root), "-d", "3", "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "volume-0.nii has no segmentation-0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert_nothing_written(tmp_path / "out")


def test_console_writes_to_nnunet_raw(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """Without -o the command writes into $nnUNet_raw and prints the quirk warning on stderr."""
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw")}
    result = run_console(str(synthetic_lits_root), "-d", "17", "-n", "LiverTumour", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == \
           f"Converted 8 training and 2 test cases to {tmp_path / 'raw' / 'Dataset017_LiverTumour'}"
    assert result.stderr.startswith("WARNING: lits_011: ") and "segmentation-11.nii" in result.stderr
    assert len(list((tmp_path / "raw" / "Dataset017_LiverTumour" / "imagesTr").iterdir())) == 8


def test_console_without_output_folder(synthetic_lits_root: Path) -> None:
    """Neither -o nor $nnUNet_raw: a usage error (exit 2) that says what to do."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_raw"}
    result = run_console(str(synthetic_lits_root), "-d", "3", env=env)
    assert result.returncode == 2
    assert "error: no output folder: pass -o OUTPUT_FOLDER or set the nnUNet_raw" in result.stderr
