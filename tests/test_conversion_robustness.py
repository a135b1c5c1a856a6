"""Issue 14 items 1-7: damaged and unusual inputs, failed writes, flipped geometry, NaNs, kills and id clashes,
each reproduced on the synthetic LiTS release and run through the real ``nnunet_ext_convert_lits`` command
(``python -m nnunet_ext.dataset_conversion.lits``) in a subprocess.

Every failing run converts with ``--overwrite`` into an nnUNet_raw that already holds a converted
``Dataset003_LiTS``: afterwards that folder must be byte for byte as before, with nothing new next to it
(no ``.partial-*`` leftovers), the exit status non-zero and the message naming the file and the reason.
"""
import fcntl
import hashlib
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.dataset_conversion.lits import convert_lits
from nnunet_ext.synthetic.lits import make_synthetic_lits

CONVERTER = [sys.executable, "-m", "nnunet_ext.dataset_conversion.lits"]
BATCH_1, BATCH_2 = "Training Batch 1", "Training Batch 2"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones included) -> digest of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def existing_raw(synthetic_lits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An nnUNet_raw holding ``Dataset003_LiTS`` converted from the default synthetic release."""
    raw = tmp_path_factory.mktemp("existing") / "nnUNet_raw"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_lits(synthetic_lits_root, 3, raw)
    return raw


class Workspace:
    """A private copy of the release and of the existing nnUNet_raw, with empty preprocessed/results folders."""

    def __init__(self, release: Path, existing_raw: Path, tmp_path: Path):
        self.root = Path(shutil.copytree(release, tmp_path / "lits"))
        self.raw = Path(shutil.copytree(existing_raw, tmp_path / "nnUNet_raw"))
        self.preprocessed, self.results = tmp_path / "nnUNet_preprocessed", tmp_path / "nnUNet_results"
        self.preprocessed.mkdir()
        self.results.mkdir()
        self.before = snapshot(self.raw)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results)}

    def source(self, kind: str, number: int) -> Path:
        return self.root / (BATCH_1 if number < 4 else BATCH_2) / f"{kind}-{number}.nii"

    def command(self, *extra: str, root: Path | None = None) -> list[str]:
        return [*CONVERTER, str(root or self.root), "-d", "3", "--overwrite", *extra]

    def convert(self, *extra: str, root: Path | None = None, shell_prefix: str = "") -> subprocess.CompletedProcess:
        command = self.command(*extra, root=root)
        if shell_prefix:
            command = ["bash", "-c", f"{shell_prefix}; exec \"$@\"", "bash", *command]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=600)

    def assert_refused(self, result: subprocess.CompletedProcess, *fragments: str) -> str:
        """Exit 1, one ``error:`` line naming every fragment, no traceback, nnUNet_raw exactly as before."""
        error = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1, result.stderr
        assert error.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
        for fragment in fragments:
            assert fragment in error, (fragment, error)
        assert snapshot(self.raw) == self.before
        return error


@pytest.fixture
def work(synthetic_lits_root: Path, existing_raw: Path, tmp_path: Path) -> Workspace:
    return Workspace(synthetic_lits_root, existing_raw, tmp_path)


def rewrite(path: Path, array: np.ndarray, like: sitk.Image | None = None) -> None:
    """Write ``array`` (numpy z, y, x) to ``path`` with the geometry of ``like`` (default: the file's own)."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like if like is not None else sitk.ReadImage(str(path)))
    sitk.WriteImage(image, str(path))


# ------------------------------------------------------------------------------ item 1: truncated files
@pytest.mark.parametrize("kind, ending", [("volume", ".nii"), ("volume", ".nii.gz"), ("segmentation", ".nii")])
def test_truncated_file_is_refused(work: Workspace, kind: str, ending: str) -> None:
    """A file cut to half its size: SimpleITK would zero-fill it; the converter names it and publishes nothing."""
    path = work.source(kind, 2)
    if ending == ".nii.gz":
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path) + ".gz")
        path.unlink()
        path = Path(str(path) + ".gz")
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    work.assert_refused(work.convert(), str(path), "truncated")


# ---------------------------------------------------------------------------------- item 2: failed writes
@pytest.mark.parametrize("processes", ["1", "2"])
def test_failed_write_aborts(work: Workspace, processes: str) -> None:
    """``ulimit -f 16``: every compressed image is cut at 16 KiB; the first write fails verification and stops
    the run (in a worker process too)."""
    result = work.convert("-np", processes, shell_prefix="ulimit -f 16")
    work.assert_refused(result, "case lits_", "writing imagesTr/lits_", "failed", "file size limit")


# ------------------------------------------------------------------------------- item 3: flipped geometry
def converted_label(work: Workspace, number: int) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(work.raw / "Dataset003_LiTS" / "labelsTr" /
                                                     f"lits_{number:03d}.nii.gz")))


@pytest.mark.parametrize("change", ["flip_z", "flip_x", "swap_xy"])
def test_flipped_or_permuted_label_is_reoriented_exactly(work: Workspace, change: str) -> None:
    """The same physical label stored with a reversed (or swapped) axis and its true header: copying the volume
    header would mirror it; the converter resamples it onto the volume grid, voxel for voxel equal to the truth."""
    path = work.source("segmentation", 2)
    truth = sitk.ReadImage(str(path))
    stored = {"flip_z": lambda: sitk.Flip(truth, [False, False, True]),
              "flip_x": lambda: sitk.Flip(truth, [True, False, False]),
              "swap_xy": lambda: sitk.PermuteAxes(truth, [1, 0, 2])}[change]()
    sitk.WriteImage(stored, str(path))
    mirrored = sitk.GetArrayFromImage(stored)
    assert mirrored.shape != sitk.GetArrayFromImage(truth).shape or \
        not np.array_equal(mirrored, sitk.GetArrayFromImage(truth))
    result = work.convert()
    assert result.returncode == 0, result.stderr
    assert "WARNING: lits_002: the direction of" in result.stderr and "resampled the label exactly" in result.stderr
    np.testing.assert_array_equal(converted_label(work, 2), sitk.GetArrayFromImage(truth))


def test_header_only_flip_is_refused(work: Workspace) -> None:
    """A direction flipped in the header alone (voxels not moved, origin unchanged) describes other voxels:
    neither copying nor resampling is right, so the case is refused with the reason."""
    path = work.source("segmentation", 2)
    image = sitk.ReadImage(str(path))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # the volume has diag(1, 1, -1)
    sitk.WriteImage(image, str(path))
    work.assert_refused(work.convert(), "direction mismatch", str(path), "cannot be mapped exactly")


# ----------------------------------------------------------------------------------------- item 4: NaN/inf
def nan_volume(work: Workspace) -> tuple[Path, np.ndarray]:
    path = work.source("volume", 1)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    array[3, 4, 5], array[6, 7, 8] = np.nan, np.inf
    rewrite(path, array)
    return path, array


def test_nan_in_volume_is_refused(work: Workspace) -> None:
    path, _ = nan_volume(work)
    work.assert_refused(work.convert(), str(path), "2 non-finite voxels", "--nan-to")


def test_nan_to_replaces_them(work: Workspace) -> None:
    path, array = nan_volume(work)
    result = work.convert("--nan-to", "-1024")
    assert result.returncode == 0, result.stderr
    converted = sitk.GetArrayFromImage(sitk.ReadImage(str(work.raw / "Dataset003_LiTS" / "imagesTr" /
                                                          "lits_001_0000.nii.gz")))
    assert converted[3, 4, 5] == converted[6, 7, 8] == -1024
    finite = np.isfinite(array)
    np.testing.assert_array_equal(converted[finite], array[finite])


def test_nan_in_label_is_refused(work: Workspace) -> None:
    path = work.source("segmentation", 9)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    array[2, 2, 2] = np.nan
    rewrite(path, array)
    work.assert_refused(work.convert(), str(path), "non-finite label values")


# -------------------------------------------------------------------------------------- item 5: signals
@pytest.fixture(scope="module")
def large_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 training cases, so that a conversion is still writing when the signal arrives."""
    root = tmp_path_factory.mktemp("large") / "lits"
    make_synthetic_lits(root, num_training=40, num_test=0)
    return root


def start_and_wait_for_writing(work: Workspace, root: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """Start a conversion and return once its temporary folder holds a written image."""
    process = subprocess.Popen(work.command(*extra, root=root), env=work.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        partial = [p for p in work.raw.glob(".Dataset003_LiTS.partial-*") if any((p / "imagesTr").glob("*"))]
        if partial:
            return process, partial[0]
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"the conversion never started writing: {process.communicate()}")


@pytest.mark.parametrize("signum, processes", [(signal.SIGINT, "1"), (signal.SIGTERM, "1"), (signal.SIGHUP, "1"),
                                               (signal.SIGTERM, "2")])
def test_signal_while_writing_cleans_up(work: Workspace, large_release: Path, signum: int, processes: str) -> None:
    """SIGINT, SIGTERM and SIGHUP during writing: one line, exit 128 + signal, the temporary folder removed and the
    existing dataset untouched."""
    process, partial = start_and_wait_for_writing(work, large_release, "-np", processes)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines()[-1] == (f"error: interrupted by {name}; nothing was published "
                                               f"(temporary files removed)")
    assert "Traceback" not in stderr
    assert not partial.exists() and snapshot(work.raw) == work.before


def test_sigkill_leftover_is_removed_by_the_next_run(work: Workspace, large_release: Path) -> None:
    """SIGKILL cannot be handled: the partial folder stays; the next run removes it and says so."""
    process, partial = start_and_wait_for_writing(work, large_release)
    process.kill()
    process.communicate(timeout=60)
    assert partial.exists()
    result = work.convert()
    assert result.returncode == 0, result.stderr
    assert f"Removed {partial}, left by an interrupted conversion (process {process.pid})" in result.stderr
    assert [p.name for p in work.raw.iterdir()] == ["Dataset003_LiTS"]


# ------------------------------------------------------------------------- item 6: id used elsewhere
@pytest.mark.parametrize("folder", ["preprocessed", "results"])
def test_dataset_id_used_in_preprocessed_or_results_is_refused(work: Workspace, folder: str) -> None:
    other = getattr(work, folder) / "Dataset003_Other"
    other.mkdir()
    work.assert_refused(work.convert(), str(other), "already uses dataset id 3")


# ------------------------------------------------------------------------------ item 7: input is a file
def test_input_root_that_is_a_file(work: Workspace) -> None:
    path = work.source("volume", 0)
    work.assert_refused(work.convert(root=path), f"input {path} is a file, not a folder")
    missing = work.root / "no such folder"
    work.assert_refused(work.convert(root=missing), f"input folder {missing} does not exist")


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_reads_everything_and_writes_nothing(work: Workspace) -> None:
    result = work.convert("--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        f"Dry run: all 10 cases are valid; would write 8 training and 2 test cases, dataset.json to "
        f"{work.raw / 'Dataset003_LiTS'} (replacing it); nothing was written")
    assert snapshot(work.raw) == work.before
    path = work.source("volume", 9)
    path.write_bytes(path.read_bytes()[:-100])
    work.assert_refused(work.convert("--dry-run"), str(path), "truncated")


# ------------------------------------------------------------------------------------------- progress bar
def test_progress_bar_on_a_terminal(work: Workspace) -> None:
    """On a terminal (a pseudo-terminal of 120 columns) stderr shows a tqdm bar (``40%|####  | 4/10 [...case/s]``);
    the log lines stay on stdout (without a terminal, as in the tests above, there is no bar)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(work.command(), env=work.env, stdin=terminal, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    stdout = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 0
    assert re.search(rb"\d+%\|.*\| \d+/10 \[", shown) and b"case/s" in shown
    assert stdout.splitlines()[0] == "[1/10] volume-0.nii -> lits_000"


# ---------------------------------------------------------------------------------- all problems at once
def test_every_bad_file_is_named_in_one_run(work: Workspace) -> None:
    """Pairing and header problems (found first) and voxel problems of the other cases come in one error."""
    truncated, nan, label_3 = work.source("volume", 2), work.source("volume", 1), work.source("segmentation", 9)
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(nan))).astype(np.float32)
    array[1, 1, 1] = np.nan
    rewrite(nan, array)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(label_3)))
    array[2, 2, 2] = 3
    rewrite(label_3, array)
    flipped = work.source("segmentation", 10)
    image = sitk.ReadImage(str(flipped))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(flipped))
    work.source("segmentation", 0).unlink()
    result = work.convert()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr[result.stderr.index("error: "):].strip().splitlines()
    assert lines[0] == "error: 5 problems, nothing was written:"
    expected = [(work.source("volume", 0), "has no segmentation-0"), (flipped, "direction mismatch"),
                (nan, "non-finite voxels"), (truncated, "is truncated"), (label_3, "has label values [3]")]
    assert len(lines) == 1 + len(expected)
    for line, (path, reason) in zip(lines[1:], expected):
        assert str(path) in line and reason in line, (line, path, reason)
    assert snapshot(work.raw) == work.before
