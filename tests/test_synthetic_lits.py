"""Tests of the synthetic LiTS generator (``nnunet_ext.synthetic.lits``) on real files."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.synthetic.lits import make_synthetic_lits

BATCH_1, BATCH_2, TEST = "Training Batch 1", "Training Batch 2", "LITS-Challenge-Test-Data"
EXPECTED_FILES = (
    {f"{BATCH_1}/{kind}-{n}.nii" for n in (0, 1, 2, 3) for kind in ("volume", "segmentation")}
    | {f"{BATCH_2}/{kind}-{n}.nii" for n in (8, 9, 10, 11) for kind in ("volume", "segmentation")}
    | {f"{TEST}/test-volume-{n}.nii" for n in (0, 1)}
)
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def relative_files(root: Path) -> set[str]:
    """All files under ``root`` as POSIX paths relative to it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def training_file(root: Path, kind: str, number: int) -> Path:
    """``volume-N.nii`` or ``segmentation-N.nii`` of the default synthetic release."""
    return root / (BATCH_1 if number < 4 else BATCH_2) / f"{kind}-{number}.nii"


def assert_identity_geometry(image: sitk.Image) -> None:
    """Spacing 1, origin 0, identity direction."""
    assert image.GetSpacing() == (1.0, 1.0, 1.0)
    assert image.GetOrigin() == (0.0, 0.0, 0.0)
    assert image.GetDirection() == IDENTITY_DIRECTION


def test_exact_layout_and_names(synthetic_lits_root: Path) -> None:
    """Real LiTS folder and file names, uncompressed, numbers not zero padded."""
    assert relative_files(synthetic_lits_root) == EXPECTED_FILES
    names = sorted(p.name for p in (synthetic_lits_root / BATCH_2).glob("volume-*.nii"))
    assert names == ["volume-10.nii", "volume-11.nii", "volume-8.nii", "volume-9.nii"]


def test_return_value_describes_the_release(tmp_path: Path) -> None:
    """The returned dict names cases, batches and quirk cases consistently with the files."""
    info = make_synthetic_lits(tmp_path)
    assert info["training_cases"] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert info["batches"] == {BATCH_1: [0, 1, 2, 3], BATCH_2: [8, 9, 10, 11]}
    assert info["test_cases"] == [0, 1]
    assert info["identity_label_case"] == 11
    assert info["identity_affine_case"] == 8
    assert info["tumour_free_cases"] == [1, 9]
    for number in info["training_cases"]:
        volume = sitk.ReadImage(str(training_file(tmp_path, "volume", number)))
        assert volume.GetSize() == info["sizes"][number]
        assert np.allclose(volume.GetSpacing(), info["spacings"][number], atol=1e-6)


def test_volumes_are_ct_like_and_labels_valid(synthetic_lits_root: Path) -> None:
    """int16 HU volumes with liver ~60 HU, tumour ~25 HU, air outside; uint8 labels in {0, 1, 2}."""
    tumour_cases = []
    for number in (0, 1, 2, 3, 8, 9, 10, 11):
        volume = sitk.ReadImage(str(training_file(synthetic_lits_root, "volume", number)))
        label = sitk.ReadImage(str(training_file(synthetic_lits_root, "segmentation", number)))
        assert volume.GetPixelID() == sitk.sitkInt16
        assert label.GetPixelID() == sitk.sitkUInt8
        assert volume.GetSize() == label.GetSize()
        hu, seg = sitk.GetArrayFromImage(volume), sitk.GetArrayFromImage(label)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}
        assert 500 < (seg == 1).sum() < 0.2 * seg.size
        assert abs(hu[seg == 1].mean() - 60) < 3
        assert hu[0, 0, :5].mean() < -950
        if (seg == 2).any():
            tumour_cases.append(number)
            assert abs(hu[seg == 2].mean() - 25) < 8
    assert tumour_cases == [0, 2, 3, 8, 10, 11]


def test_sizes_and_spacings_vary_and_are_anisotropic(synthetic_lits_root: Path) -> None:
    """Tiny varied sizes around 40x40x24; in-plane 0.7-0.9 mm, slices 2-3 mm, flipped z axis."""
    sizes, spacings = set(), set()
    for number in (0, 1, 2, 3, 9, 10, 11):
        volume = sitk.ReadImage(str(training_file(synthetic_lits_root, "volume", number)))
        x, y, z = volume.GetSize()
        assert 36 <= x <= 44 and 36 <= y <= 44 and 20 <= z <= 28
        sx, sy, sz = volume.GetSpacing()
        assert sx == pytest.approx(sy) and 0.7 <= sx <= 0.9 and sz in (2.0, 2.5, 3.0)
        assert volume.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
        assert all(-420 <= o <= -160 for o in volume.GetOrigin())
        sizes.add(volume.GetSize())
        spacings.add(round(sx, 3))
    assert len(sizes) == 7 and len(spacings) == 7


def test_identity_affine_quirks(synthetic_lits_root: Path) -> None:
    """Case 11: identity label geometry on a non-identity volume; case 8: both identity; others equal."""
    volume_11 = sitk.ReadImage(str(training_file(synthetic_lits_root, "volume", 11)))
    assert_identity_geometry(sitk.ReadImage(str(training_file(synthetic_lits_root, "segmentation", 11))))
    assert volume_11.GetSpacing()[2] > 1.5 and volume_11.GetDirection()[8] == -1.0
    for kind in ("volume", "segmentation"):
        assert_identity_geometry(sitk.ReadImage(str(training_file(synthetic_lits_root, kind, 8))))
    for number in (0, 1, 2, 3, 9, 10):
        volume = sitk.ReadImage(str(training_file(synthetic_lits_root, "volume", number)))
        label = sitk.ReadImage(str(training_file(synthetic_lits_root, "segmentation", number)))
        assert label.GetSpacing() == volume.GetSpacing()
        assert label.GetOrigin() == volume.GetOrigin()
        assert label.GetDirection() == volume.GetDirection()


def test_deterministic_for_a_fixed_seed(synthetic_lits_root: Path, tmp_path: Path) -> None:
    """Same seed: byte-identical files; another seed: different voxels."""
    make_synthetic_lits(tmp_path / "same")
    make_synthetic_lits(tmp_path / "other", seed=1)
    for name in EXPECTED_FILES:
        assert (tmp_path / "same" / name).read_bytes() == (synthetic_lits_root / name).read_bytes(), name
    assert (tmp_path / "other" / f"{BATCH_1}/volume-0.nii").read_bytes() != \
           (synthetic_lits_root / f"{BATCH_1}/volume-0.nii").read_bytes()


def test_refuses_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    """A non-empty folder is refused; overwrite replaces only the generated folders."""
    make_synthetic_lits(tmp_path, num_training=3, num_test=1)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic_lits(tmp_path, num_training=2, num_test=0)
    info = make_synthetic_lits(tmp_path, num_training=2, num_test=0, overwrite=True)
    assert info["training_cases"] == [0, 2] and info["identity_label_case"] == 2
    assert relative_files(tmp_path) == {"notes.txt", f"{BATCH_1}/volume-0.nii", f"{BATCH_1}/segmentation-0.nii",
                                        f"{BATCH_2}/volume-2.nii", f"{BATCH_2}/segmentation-2.nii"}


def test_console_command(tmp_path: Path) -> None:
    """``nnunet_ext_make_synthetic_lits OUT --training 3 --test 1 --seed 5``, then a refused rerun."""
    out = tmp_path / "lits"
    command = ["nnunet_ext_make_synthetic_lits", str(out), "--training", "3", "--test", "1", "--seed", "5"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert relative_files(out) == {f"{BATCH_1}/volume-0.nii", f"{BATCH_1}/segmentation-0.nii",
                                   f"{BATCH_1}/volume-1.nii", f"{BATCH_1}/segmentation-1.nii",
                                   f"{BATCH_2}/volume-4.nii", f"{BATCH_2}/segmentation-4.nii",
                                   f"{TEST}/test-volume-0.nii"}
    rerun = subprocess.run(command, capture_output=True, text=True, check=False)
    assert rerun.returncode == 1
    assert rerun.stderr.startswith("error:") and str(out) in rerun.stderr
