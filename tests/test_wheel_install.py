"""A non-editable install (a wheel) finds every trainer through ``nnunet_ext_env``'s folder, with the real
``nnUNetv2_train`` and ``nnUNetv2_predict`` in new processes.

The wheel is built from this checkout and installed without dependencies into a fresh virtual environment that
sees this environment's packages (torch, nnU-Net, ...) through a ``.pth`` file, so nothing is downloaded but
nnU-Net's own small wheel (for its console scripts); the fresh environment's ``nnunet_ext`` is the wheel's copy in
its site-packages, never the repository.
"""
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest

from nnunet_ext.training.registry import TRAINERS
from tests.conftest import DEMO_DATASET_ID

REPOSITORY = Path(__file__).resolve().parents[1]
TRAINER = "nnUNetTrainerDPCNet_quick"


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    """Run outside the repository (a ``python -c`` in it would import the repository's package)."""
    kwargs.setdefault("cwd", "/")
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command[:2]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", work / "dist",
        REPOSITORY)
    wheel = next((work / "dist").glob("nnunet_ext-*.whl"))
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    # first the two packages (pip would take nnU-Net as installed once the parent's packages are visible) ...
    run(python, "-m", "pip", "install", "-q", "--no-deps", wheel, f"nnunetv2=={version('nnunetv2')}")
    # ... then the parent environment's packages (torch, ...) behind the fresh environment's own
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site_packages / "parent_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_env_folder_is_the_installed_copy(wheel_venv):
    printed = run(wheel_venv / "bin" / "nnunet_ext_env").stdout.strip()
    folder = Path(printed.removeprefix("export nnUNet_extTrainer=").strip('"'))
    assert folder.is_dir() and (folder / "nnunet_ext_trainers.py").is_file()
    assert wheel_venv in folder.parents and REPOSITORY not in folder.parents


def test_every_trainer_is_found_through_the_installed_folder(wheel_venv):
    folder = run(wheel_venv / "bin" / "nnunet_ext_env").stdout.strip().removeprefix("export nnUNet_extTrainer=")
    script = ("import sys; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
              "for name in sys.argv[1:]:\n"
              "    c = f(name); print('FOUND', name, c.__module__, sys.modules[c.__module__].__file__)")
    output = run(wheel_venv / "bin" / "python", "-c", script, *TRAINERS,
                 env={"PATH": "/usr/bin:/bin", "nnUNet_extTrainer": folder.strip('"')}).stdout
    found = [line.split() for line in output.splitlines() if line.startswith("FOUND")]
    assert [f[1] for f in found] == list(TRAINERS)
    assert all(str(wheel_venv) in f[3] for f in found), found  # classes come from the wheel, not the repository


def test_train_and_predict_with_the_wheel(wheel_venv, demo_run, tmp_path):
    folder = run(wheel_venv / "bin" / "nnunet_ext_env").stdout.strip().removeprefix("export nnUNet_extTrainer=")
    env = {**demo_run.env, "nnUNet_results": str(tmp_path / "results"), "nnUNet_extTrainer": folder.strip('"')}
    bin_ = wheel_venv / "bin"
    train = run(bin_ / "nnUNetv2_train", DEMO_DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu", env=env)
    assert f"Using trainer '{TRAINER}' from: {folder.strip(chr(34))}" in train.stdout
    predictions = tmp_path / "predictions"
    run(bin_ / "nnUNetv2_predict", "-i", demo_run.workdir / "validation_images", "-o", predictions,
        "-d", DEMO_DATASET_ID, "-c", "3d_fullres", "-f", 0, "-tr", TRAINER, "-device", "cpu", "--disable_tta",
        "-npp", 1, "-nps", 1, env=env)
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == \
        sorted(p.name.replace("_0000", "") for p in (demo_run.workdir / "validation_images").glob("*.nii.gz"))


def test_the_kernel_sources_are_installed(wheel_venv):
    """The compiled CPU kernels build on first use from their sources and shared headers in the installed package."""
    script = ("import nnunet_ext.building_blocks.cpu_extension as c\n"
              "print(' '.join(sorted(p.name for p in c.CSRC.iterdir())))")
    installed = run(wheel_venv / "bin" / "python", "-c", script).stdout.split()
    csrc = REPOSITORY / "nnunet_ext" / "building_blocks" / "csrc"
    assert installed == sorted(p.name for p in csrc.iterdir() if p.suffix in (".cpp", ".h"))
