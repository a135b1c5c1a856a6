"""Unit tests of the converter toolkit ``nnunet_ext.dataset_conversion.common`` on real files, plus a sweep
over every registered converter's command line (``CONVERTERS``)."""
import importlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
from PIL import Image

from nnunet_ext.dataset_conversion import CONVERTERS, common


# ------------------------------------------------------------------------------------------ Problems
def test_problems_collect_every_problem_and_raise_once() -> None:
    """Three problems -> one error listing all three, each with its file; a message naming its file is kept."""
    problems = common.Problems()
    problems.add(Path("/data/a.png"), "has no mask")
    problems.add(Path("/data/b.png"), "/data/b.png is empty")
    assert problems.check(Path("/data/c.png"), common.label_values_checked, np.array([0, 7]), [0, 1], "/data/c.png") \
        is None
    assert len(problems) == 3
    with pytest.raises(common.ConversionError) as error:
        problems.raise_if_any()
    assert str(error.value).splitlines() == ["3 problems, nothing was written:", "  - /data/a.png: has no mask",
                                             "  - /data/b.png is empty",
                                             "  - /data/c.png has label values [7] outside [0, 1]"]


def test_single_problem_is_one_line_and_no_problem_passes() -> None:
    problems = common.Problems()
    problems.raise_if_any()
    problems.add(None, "x.nii is truncated")
    with pytest.raises(common.ConversionError, match=r"^x\.nii is truncated$"):
        problems.raise_if_any()


# ----------------------------------------------------------------------------------------- discovery
def test_find_files_skips_hidden_and_sorts_numbers_by_value(tmp_path: Path) -> None:
    for name in ("a/case10.png", "a/case2.PNG", "a/._case3.png", "a/.hidden.png", "__MACOSX/a/case1.png",
                 ".git/case4.png", "b/case1.png", "b/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in common.find_files(tmp_path, (".png",))]
    assert found == ["a/case2.PNG", "a/case10.png", "b/case1.png"]
    assert len(common.find_files(tmp_path)) == 4


def test_index_and_pair_report_duplicates_and_unpaired_files() -> None:
    problems = common.Problems()
    images = common.index_by([Path("x/img1.png"), Path("y/img1.png"), Path("x/img2.png"), Path("x/img3.png")],
                             lambda p: int(p.stem[3:]), problems, what="image number")
    masks = {1: Path("m/1.png"), 3: Path("m/3.png"), 4: Path("m/4.png")}
    pairs = common.pair_files(images, masks, problems, label_word="mask {key}")
    assert pairs == [(1, Path("x/img1.png"), Path("m/1.png")), (3, Path("x/img3.png"), Path("m/3.png"))]
    assert problems.messages == ["duplicate image number 1: x/img1.png and y/img1.png", "x/img2.png has no mask 2",
                                 "m/4.png has no image"]


def test_input_root_missing_file_or_archive(tmp_path: Path) -> None:
    (tmp_path / "release.zip").write_bytes(b"PK")
    with pytest.raises(common.ConversionError, match=r"input folder .*nowhere does not exist"):
        common.check_input_root(tmp_path / "nowhere")
    with pytest.raises(common.ConversionError, match=r"release\.zip is a file, not a folder \(extract the archive"):
        common.check_input_root(tmp_path / "release.zip")
    assert common.check_input_root(tmp_path) == tmp_path


# ------------------------------------------------------------------------------------------- readers
def nifti(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
@pytest.mark.parametrize("keep", ["half", "all but 10 bytes"])
def test_truncated_nifti_is_refused(tmp_path: Path, name: str, keep: str) -> None:
    """A cut file: SimpleITK alone would zero-fill the missing voxels; the reader refuses it."""
    array = np.random.default_rng(0).integers(-1000, 1000, (20, 32, 32)).astype(np.int16)
    path = nifti(tmp_path / name, array, compress=name.endswith(".gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(common.read_image(path)), array)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size // 2 if keep == "half" else size - 10])
    with pytest.raises(common.ConversionError, match=rf"{name} is truncated"):
        common.read_image(path)


def test_non_finite_voxels_are_refused_or_replaced(tmp_path: Path) -> None:
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3], array[2, 2, 2], array[0, 0, 0] = np.nan, np.inf, -np.inf
    path = nifti(tmp_path / "v.nii.gz", array)
    with pytest.raises(common.ConversionError, match=r"v\.nii\.gz has 3 non-finite voxels .* --nan-to VALUE"):
        common.read_image(path)
    fixed = sitk.GetArrayFromImage(common.read_image(path, nan_to=-1024.0))
    assert fixed[1, 2, 3] == fixed[2, 2, 2] == fixed[0, 0, 0] == -1024.0 and np.count_nonzero(fixed) == 3


@pytest.mark.parametrize("value, message", [(np.nan, r"non-finite label values"),
                                            (1.5, r"non-integral label values, e\.g\. 1\.5"),
                                            (3.0, r"label values \[3\] outside \[0, 1, 2\]")])
def test_bad_label_values(tmp_path: Path, value: float, message: str) -> None:
    array = np.zeros((4, 5, 6), np.float32)
    array[2, 2, 2] = value
    with pytest.raises(common.ConversionError, match=rf"s\.nii\.gz has {message}"):
        common.read_label(nifti(tmp_path / "s.nii.gz", array), [0, 1, 2])


def test_read_label_keeps_geometry_as_uint8(tmp_path: Path) -> None:
    array = np.random.default_rng(1).integers(0, 3, (4, 5, 6)).astype(np.float64)
    label = common.read_label(nifti(tmp_path / "s.nii.gz", array), [0, 1, 2])
    assert label.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(label.GetSpacing(), (0.7, 0.7, 2.5), rtol=1e-6)  # NIfTI stores float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), array)


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(common.ConversionError, match=r"cannot read .*img\.png: .*truncated"):
        common.read_png(path)


def test_to_grey() -> None:
    """Equal colour channels -> that channel; true colour -> ITU-R 601 luma (255, 0, 0) -> 76; alpha dropped."""
    grey_rgba = np.stack([np.full((2, 3), 90, np.uint8)] * 3 + [np.zeros((2, 3), np.uint8)], axis=2)
    np.testing.assert_array_equal(common.to_grey(grey_rgba, "x"), np.full((2, 3), 90))
    red = np.zeros((2, 3, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_array_equal(common.to_grey(red, "x"), np.full((2, 3), 76))  # 255 * 299 / 1000 = 76.2


# ------------------------------------------------------------------------------------------- writers
@pytest.fixture
def file_size_limit():
    """Lower this process's file size limit like ``ulimit -f 16`` (16 KiB); Python ignores SIGXFSZ, so a write
    past it fails with EFBIG. The limit is restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_nifti_writer_round_trip_and_failed_write(tmp_path: Path, file_size_limit) -> None:
    small = sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    common.write_nifti(small, tmp_path / "imagesTr" / "a_0000.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "imagesTr" / "a_0000.nii.gz"))),
                                  np.arange(60).reshape(3, 4, 5))
    noise = np.random.default_rng(0).integers(-1000, 1000, (24, 40, 40)).astype(np.int16)  # ~50 KiB compressed
    with pytest.raises(common.WriteError, match=r"writing imagesTr/b_0000\.nii\.gz failed: .*incomplete"):
        common.write_nifti(sitk.GetImageFromArray(noise), tmp_path / "imagesTr" / "b_0000.nii.gz")


def test_png_writer_failed_write(tmp_path: Path, file_size_limit) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)  # 64 KiB, incompressible
    with pytest.raises(common.WriteError, match=r"writing imagesTr/b_0000\.png failed"):
        common.write_png(noise, tmp_path / "imagesTr" / "b_0000.png")


def test_png_image_writer_grey_and_rgb_as_nnunet_reads_them(tmp_path: Path) -> None:
    """Grey: one ``_0000.png``; RGB: ``_0000/_0001/_0002``, which nnU-Net's NaturalImage2DIO stacks to 3 channels."""
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    grey_files = common.write_png_image(rgb, tmp_path, "c1")
    rgb_files = common.write_png_image(rgb, tmp_path, "c2", test=True, rgb=True)
    assert [p.relative_to(tmp_path).as_posix() for p in grey_files + rgb_files] == [
        "imagesTr/c1_0000.png", "imagesTs/c2_0000.png", "imagesTs/c2_0001.png", "imagesTs/c2_0002.png"]
    grey, _ = NaturalImage2DIO().read_images([str(p) for p in grey_files])
    channels, _ = NaturalImage2DIO().read_images([str(p) for p in rgb_files])
    assert grey.shape == (1, 1, 20, 30) and channels.shape == (3, 1, 20, 30)
    np.testing.assert_array_equal(channels[:, 0], rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(grey[0, 0], np.asarray(Image.fromarray(rgb).convert("L")))
    assert len(common.png_channel_names(rgb=True)) == 3 and len(common.png_channel_names()) == 1


def test_png_mask_writer_checks_consecutive_labels(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    path = common.write_png_mask(mask, tmp_path / "labelsTr" / "c1.png", num_classes=2)
    np.testing.assert_array_equal(NaturalImage2DIO().read_seg(str(path))[0][0, 0], mask)
    mask[0, 0] = 255
    with pytest.raises(common.ConversionError, match=r"c2\.png has label values \[255\] outside \[0, 1\]"):
        common.write_png_mask(mask, tmp_path / "labelsTr" / "c2.png", num_classes=2)
    assert not (tmp_path / "labelsTr" / "c2.png").exists()


def test_splits_are_checked(tmp_path: Path) -> None:
    with pytest.raises(common.ConversionError) as error:
        common.write_splits(tmp_path, [{"train": ["a", "b"], "val": ["b", "zz"]}, {"train": ["a"]}], ["a", "b"])
    assert str(error.value).splitlines()[1:] == [
        "  - split 0 names cases that are not training cases: ['zz']",
        "  - split 0 has cases in both train and val: ['b']",
        "  - split 1 must have exactly the keys 'train' and 'val', got ['train']"]
    assert not (tmp_path / "splits_final.json").exists()


# ----------------------------------------------------------------------------------------- geometry
def header(image: sitk.Image, name: str) -> common.Header:
    return common.Header(Path(name), image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def volume_and_label(dimension: int) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    shape = (5, 6, 7)[:dimension]
    truth = np.random.default_rng(dimension).integers(0, 3, shape).astype(np.uint8)
    volume = sitk.GetImageFromArray(truth.astype(np.int16) * 100)
    volume.SetSpacing((0.8, 0.9, 2.5)[:dimension])
    volume.SetOrigin((-10.0, -20.0, 30.0)[:dimension])
    volume.SetDirection(np.diag([1.0, 1.0, -1.0][:dimension - 1] + [-1.0]).ravel().tolist())
    label = sitk.GetImageFromArray(truth)
    label.CopyInformation(volume)
    return volume, label, truth


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("change", ["flip_last", "flip_first", "permute", "flip_and_permute"])
def test_flipped_or_permuted_label_is_resampled_exactly(dimension: int, change: str) -> None:
    """Same voxels stored along a reversed/permuted axis with a matching header -> equal to the truth."""
    volume, label, truth = volume_and_label(dimension)
    flips = {"flip_last": [False] * (dimension - 1) + [True], "flip_first": [True] + [False] * (dimension - 1),
             "permute": None, "flip_and_permute": [True] + [False] * (dimension - 1)}[change]
    stored = sitk.Flip(label, flips) if flips else label
    if "permute" in change:
        stored = sitk.PermuteAxes(stored, [1, 0] + list(range(2, dimension)))
    assert stored.GetDirection() != volume.GetDirection()
    fix = common.geometry_fix(header(volume, "v.nii"), header(stored, "s.nii"))
    assert fix.action == "reorient" and "s.nii" in fix.reason
    np.testing.assert_array_equal(sitk.GetArrayFromImage(common.label_onto_volume(stored, volume, fix)), truth)


@pytest.mark.parametrize("dimension", [2, 3])
def test_float_noise_and_origin_offset_keep_the_voxels(dimension: int) -> None:
    volume, label, truth = volume_and_label(dimension)
    label.SetOrigin([o + 1e-5 for o in volume.GetOrigin()])
    label.SetDirection([d + 1e-6 for d in volume.GetDirection()])
    assert common.geometry_fix(header(volume, "v"), header(label, "s")).action == "same"
    label.SetOrigin([o + 5.0 for o in volume.GetOrigin()])
    fix = common.geometry_fix(header(volume, "v"), header(label, "s"))
    assert fix.action == "copy" and "origin" in fix.reason
    result = common.label_onto_volume(label, volume, fix)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), truth)
    assert result.GetOrigin() == volume.GetOrigin()


def test_real_disagreements_are_refused_with_the_reason() -> None:
    volume, label, truth = volume_and_label(3)
    header_only = sitk.GetImageFromArray(truth)  # direction flipped in the header only: voxels not moved
    header_only.CopyInformation(volume)
    header_only.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(common.ConversionError, match=r"direction mismatch: s has .* cannot be mapped exactly .* "
                                                     r"voxels do not coincide"):
        common.geometry_fix(header(volume, "v"), header(header_only, "s"))
    oblique = sitk.Image(label)
    c, s = np.cos(0.3), np.sin(0.3)
    oblique.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    with pytest.raises(common.ConversionError, match=r"oblique rotation"):
        common.geometry_fix(header(volume, "v"), header(oblique, "s"))
    label.SetSpacing((0.8, 0.9, 3.0))
    with pytest.raises(common.ConversionError, match=r"spacing mismatch: v has .* but s has"):
        common.geometry_fix(header(volume, "v"), header(label, "s"))
    short = sitk.GetImageFromArray(truth[:-1])
    short.SetOrigin(volume.GetOrigin())
    short.SetDirection(volume.GetDirection())
    with pytest.raises(common.ConversionError, match=r"size mismatch: v is \(7, 6, 5\) but s is \(7, 6, 4\)"):
        common.geometry_fix(header(volume, "v"), header(short, "s"))


# ------------------------------------------------------------------------------ target and atomicity
@pytest.fixture
def nnunet_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    folders = {v: tmp_path / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for variable, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(variable, str(folder))
    return folders


@pytest.mark.parametrize("folder", ["nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"])
def test_dataset_id_or_name_used_elsewhere_is_refused(nnunet_folders: dict[str, Path], folder: str) -> None:
    raw = nnunet_folders["nnUNet_raw"]
    (nnunet_folders[folder] / "Dataset003_Other").mkdir()
    (nnunet_folders[folder] / "Dataset004_Mine").mkdir()
    with pytest.raises(common.ConversionError) as error:
        common.check_target(raw, 3, "Mine", overwrite=True)
    assert str(error.value).splitlines() == [
        "2 problems, nothing was written:",
        f"  - {nnunet_folders[folder] / 'Dataset003_Other'} already uses dataset id 3; nnU-Net could not tell it "
        f"from Dataset003_Mine: remove it or choose another id",
        f"  - {nnunet_folders[folder] / 'Dataset004_Mine'} already uses dataset name Mine; nnU-Net could not tell "
        f"it from Dataset003_Mine: remove it or choose another name (-n)"]


def test_same_dataset_in_preprocessed_and_existing_target(nnunet_folders: dict[str, Path]) -> None:
    """The dataset's own preprocessed/results folders are fine; an existing raw dataset needs --overwrite."""
    raw = nnunet_folders["nnUNet_raw"]
    for folder in nnunet_folders.values():
        (folder / "Dataset003_Mine").mkdir()
    with pytest.raises(common.ConversionError, match=r"Dataset003_Mine already exists; pass --overwrite"):
        common.check_target(raw, 3, "Mine", overwrite=False)
    assert common.check_target(raw, 3, "Mine", overwrite=True) == raw / "Dataset003_Mine"
    with pytest.raises(common.ConversionError, match=r"dataset id must be between 1 and 999, got 1000"):
        common.check_target(raw, 1000, "Mine", overwrite=False)
    with pytest.raises(common.ConversionError, match=r"dataset name 'My Data' must be letters"):
        common.check_target(raw, 3, "My Data", overwrite=False)


def dead_pid() -> int:
    """The id of a process that has finished."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporary_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A dead run's partial folder (of any dataset) is removed, its moved-aside old dataset restored (a dry run only
    says so); a live run's folder of another dataset is left alone, one of the target refuses the run, and so does
    one from another host (naming the command that removes it)."""
    host, pid = socket.gethostname(), dead_pid()
    partial = tmp_path / f".Dataset003_Mine.partial-{host}-{pid}-0123abcd"
    old = tmp_path / f".Dataset003_Mine.old-{host}-{pid}-0123abce"
    other = tmp_path / f".Dataset004_Else.partial-{host}-{pid}-0123abcf"  # another dataset's, dead: removed too
    running = tmp_path / f".Dataset005_Else.partial-{host}-{os.getpid()}-0123abcf"  # another dataset's, live: kept
    for folder in (partial, old, other, running):
        (folder / "imagesTr").mkdir(parents=True)
    (old / "dataset.json").write_text("{}")
    common.check_target(tmp_path, 3, "Mine", overwrite=True, dry_run=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([partial.name, old.name, other.name, running.name])
    assert f"Would remove {partial}" in capsys.readouterr().err
    target = common.check_target(tmp_path, 3, "Mine", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "Dataset003_Mine"]
    shutil.rmtree(running)
    assert (target / "dataset.json").read_text() == "{}"
    printed = capsys.readouterr().err
    assert f"Removed {partial}, left by an interrupted conversion (process {pid})" in printed
    assert f"Removed {other}, left by an interrupted conversion (process {pid})" in printed
    assert f"Restored {target} from {old.name}" in printed

    live = tmp_path / f".Dataset003_Mine.partial-{host}-{os.getpid()}-0123abcd"
    live.mkdir()
    with pytest.raises(common.ConversionError, match=rf"still running \(process {os.getpid()}\)"):
        common.check_target(tmp_path, 3, "Mine", overwrite=True)
    live.rename(tmp_path / f".Dataset003_Mine.partial-otherhost-{pid}-0123abcd")
    with pytest.raises(common.ConversionError, match=r"left by a conversion on host otherhost; .* rm -rf '"):
        common.check_target(tmp_path, 3, "Mine", overwrite=True)


def test_atomic_dataset(tmp_path: Path) -> None:
    """Published only on success; an error removes the temporary folder and leaves an existing dataset as it was."""
    target = tmp_path / "Dataset003_Mine"
    with common.atomic_dataset(target) as partial:
        assert partial.parent == tmp_path and partial.name.startswith(".Dataset003_Mine.partial-")
        (partial / "a.txt").write_text("first")
        assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset003_Mine"] and (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"), common.atomic_dataset(target, overwrite=True) as partial:
        (partial / "b.txt").write_text("second")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset003_Mine"]
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with pytest.raises(common.ConversionError, match="already exists"), common.atomic_dataset(target) as partial:
        (partial / "b.txt").write_text("second")
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset003_Mine"]
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with common.atomic_dataset(target, overwrite=True) as partial:
        (partial / "b.txt").write_text("second")
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset003_Mine"]
    assert [p.name for p in target.iterdir()] == ["b.txt"]


# ------------------------------------------------------------------- a whole (tiny 2D) dataset through nnU-Net
@dataclass(frozen=True)
class PngCase:
    """A case of the tiny 2D dataset: a source image and mask (None for test cases)."""
    case_id: str
    image: Path
    mask: Path | None

    @property
    def test(self) -> bool:
        return self.mask is None


def convert_png_case(case: PngCase, folder: Path | None) -> str:
    """The converter shape documented in ``common``: read completely and check, write only with a folder."""
    image = common.read_png(case.image)
    mask = None if case.mask is None else common.label_values_checked(common.read_png(case.mask) // 255, [0, 1],
                                                                        case.mask)
    if folder is not None:
        common.write_png_image(image, folder, case.case_id, case.test, rgb=True, source=case.image)
        if mask is not None:
            common.write_png_mask(mask, common.label_file(folder, case.case_id, common.PNG_ENDING), num_classes=2)
    return f"{case.image.name} -> {case.case_id}"


def png_release(root: Path, num_training: int = 6) -> list[PngCase]:
    rng = np.random.default_rng(0)
    cases = []
    for k in range(num_training + 1):
        root.mkdir(parents=True, exist_ok=True)
        mask = np.zeros((24, 32), np.uint8)
        mask[4 + k:12 + k, 6:20] = 255
        image = (rng.integers(0, 60, (24, 32, 3)) + (mask[..., None] > 0) * 120).astype(np.uint8)
        Image.fromarray(image).save(root / f"img{k}.png")
        Image.fromarray(mask).save(root / f"mask{k}.png")
        mask_file = None if k == num_training else root / f"mask{k}.png"
        cases.append(PngCase(f"tiny_{k:03d}", root / f"img{k}.png", mask_file))
    return cases


DATASET_JSON = common.DatasetJson(channel_names=common.png_channel_names(rgb=True),
                                  labels={"background": 0, "object": 1}, file_ending=common.PNG_ENDING,
                                  dataset_name="Tiny")


def test_dry_run_checks_everything_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = png_release(tmp_path / "release")
    target = common.check_target(tmp_path / "raw", 7, "Tiny", overwrite=False)
    common.write_dataset(target, cases, convert_png_case, DATASET_JSON, dry_run=True)
    assert not (tmp_path / "raw").exists()
    out = capsys.readouterr().out.splitlines()
    assert out[:7] == [f"[{k + 1}/7] img{k}.png -> tiny_{k:03d}" for k in range(7)]
    assert out[7] == (f"Dry run: all 7 cases are valid; would write 6 training and 1 test cases, dataset.json to "
                      f"{target}; nothing was written")
    Image.fromarray(np.full((24, 32), 510, np.uint16)).save(cases[1].mask)  # 16-bit mask: 510 // 255 = 2
    (tmp_path / "release" / "mask4.png").write_bytes(b"broken")
    with pytest.raises(common.ConversionError) as error:
        common.write_dataset(target, cases, convert_png_case, DATASET_JSON, dry_run=True)
    lines = str(error.value).splitlines()
    assert lines[0] == "2 problems, nothing was written:"
    assert lines[1].endswith("mask1.png has label values [2] outside [0, 1]")
    assert "mask4.png" in lines[2] and "cannot read" in lines[2]
    assert not (tmp_path / "raw").exists()


def test_write_dataset_collects_case_problems_and_publishes_nothing(tmp_path: Path) -> None:
    cases = png_release(tmp_path / "release")
    (tmp_path / "release" / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "release" / "img5.png").write_bytes(b"")
    target = common.check_target(tmp_path / "raw", 7, "Tiny", overwrite=False)
    with pytest.raises(common.ConversionError, match=r"^2 problems.*\n.*img3\.png.*\n.*img5\.png"):
        common.write_dataset(target, cases, convert_png_case, DATASET_JSON, num_processes=2)
    assert list((tmp_path / "raw").iterdir()) == []


def test_tiny_2d_dataset_passes_nnunet_and_its_splits_are_used(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """RGB as three PNG channels + masks + dataset.json + splits_final.json -> nnU-Net's integrity check passes
    and its planner copies our splits file to nnUNet_preprocessed unchanged (the file it then trains with)."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    cases = png_release(tmp_path / "release")
    splits = [{"train": [f"tiny_{k:03d}" for k in range(6) if k % 2 != fold],
               "val": [f"tiny_{k:03d}" for k in range(6) if k % 2 == fold]} for fold in (0, 1)]
    target = common.write_dataset(tmp_path / "nnUNet_raw" / "Dataset007_Tiny", cases, convert_png_case,
                                  DATASET_JSON, splits=splits)
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dataset["numTraining"] == 6
    verify_dataset_integrity(str(target), num_processes=1)
    preprocessed = tmp_path / "nnUNet_preprocessed" / target.name
    preprocessed.mkdir(parents=True)
    save_json(DatasetFingerprintExtractor(7, num_processes=1).run(), str(preprocessed / "dataset_fingerprint.json"))
    ExperimentPlanner(7)  # the planner's constructor copies nnUNet_raw/<dataset>/splits_final.json
    assert json.loads((preprocessed / "splits_final.json").read_text()) == splits


# ---------------------------------------------------------------------------- every registered converter
@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_registered_converter_follows_the_command_line_conventions(name: str, tmp_path: Path) -> None:
    """``--help`` shows the common options; a missing input and an input that is a file are one ``error:``
    line each, exit 1, no traceback, nothing written."""
    module = CONVERTERS[name]
    assert callable(importlib.import_module(module).main)
    help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                               check=True).stdout
    for option in ("-d", "-n", "-o", "--overwrite", "--dry-run", "-np"):
        assert f" {option} " in help_text or f"[{option}" in help_text, option
    (tmp_path / "a_file.nii").write_bytes(b"x")
    for given, expected in (("missing", "does not exist"), ("a_file.nii", "is a file, not a folder")):
        result = subprocess.run([sys.executable, "-m", module, str(tmp_path / given), "-d", "9", "-o",
                                 str(tmp_path / "out")], capture_output=True, text=True)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ") and expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_write_dataset_refuses_repeated_case_ids_and_bad_process_count(tmp_path: Path) -> None:
    cases = png_release(tmp_path / "release")
    with pytest.raises(common.ConversionError, match=r"case ids used twice: \['tiny_000'\]"):
        common.write_dataset(tmp_path / "raw" / "Dataset007_Tiny", cases + cases[:1], convert_png_case, DATASET_JSON)
    with pytest.raises(common.ConversionError, match=r"number of processes must be at least 1, got 0"):
        common.write_dataset(tmp_path / "raw" / "Dataset007_Tiny", cases, convert_png_case, DATASET_JSON,
                             num_processes=0)
    assert not (tmp_path / "raw").exists()


def test_a_signal_swallowed_by_a_destructor_still_stops_publishing(tmp_path: Path, monkeypatch):
    """Python ignores an exception raised while a ``__del__`` runs (seen with nibabel's during garbage collection:
    a SIGINT was lost and the dataset published); the toolkit remembers the signal and raises it before publishing,
    without printing the swallowed exception's traceback (CI saw one in a converter's stderr)."""
    import signal
    import sys

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    class SignalsWhileDeleted:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler's Interrupted is raised inside __del__ and swallowed

    target = tmp_path / "Dataset001_Demo"
    with pytest.raises(common.Interrupted) as interruption:
        with common.handle_signals(), common.atomic_dataset(target) as partial:
            (partial / "dataset.json").write_text("{}")
            deleted = SignalsWhileDeleted()
            del deleted
    assert interruption.value.signum == signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # nothing published, the temporary folder removed
    assert reported == []  # Python printed nothing
    assert sys.unraisablehook == reported.append  # the previous hook restored


def test_other_unraisable_exceptions_still_reach_the_previous_hook(monkeypatch):
    """Only the swallowed :class:`Interrupted` is hidden while converting; other destructor errors are reported."""
    import sys

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(type(unraisable.exc_value)))

    class FailsWhileDeleted:
        def __del__(self):
            raise ValueError("broken destructor")

    with common.handle_signals():
        failing = FailsWhileDeleted()
        del failing
    assert seen == [ValueError]
