"""Shared pytest fixtures."""
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnunet_ext.demo import DEFAULT_TRAINER, Demo
from nnunet_ext.synthetic.lits import make_synthetic_lits


@pytest.fixture(scope="session")
def synthetic_lits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic LiTS release (default size, seed 0) in the real LiTS layout; treat it as read-only.

    Training cases 0-3 in ``Training Batch 1``, 8-11 in ``Training Batch 2``; test volumes 0 and 1
    in ``LITS-Challenge-Test-Data``. Case 11's segmentation carries an identity geometry while its
    volume does not; case 8 has identity geometry in both files. Copy it before modifying it.
    """
    root = tmp_path_factory.mktemp("synthetic_lits")
    make_synthetic_lits(root)
    return root


@dataclass(frozen=True)
class DemoRun:
    """A finished ``nnunet_ext_demo`` run: its work folder, console output and nnU-Net environment."""
    workdir: Path
    stdout: str
    env: dict

    @property
    def dataset(self) -> str:
        return f"Dataset{DEMO_DATASET_ID:03d}_SyntheticLiTS"

    def model_folder(self, trainer: str) -> Path:
        return self.workdir / "nnUNet_results" / self.dataset / f"{trainer}__nnUNetPlans__3d_fullres"

    def run(self, *command) -> subprocess.CompletedProcess:
        """Run a command in a new process with the demo's nnU-Net environment; it must succeed."""
        result = subprocess.run([str(c) for c in command], env=self.env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result


DEMO_DATASET_ID = 501


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The README's first command, run for real once per session: synthetic LiTS -> converter ->
    ``nnUNetv2_plan_and_preprocess`` -> ``nnUNetv2_train`` (DPC-Net, quick schedule) ->
    ``nnUNetv2_predict`` -> ``nnUNetv2_evaluate_folder``. Later tests reuse its preprocessed data."""
    workdir = tmp_path_factory.mktemp("demo") / "run"
    result = subprocess.run(["nnunet_ext_demo", "--workdir", str(workdir), "--dataset-id", str(DEMO_DATASET_ID),
                             "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 0, f"demo failed:\n{result.stdout}\n{result.stderr}"
    env = Demo(workdir, DEFAULT_TRAINER, DEMO_DATASET_ID, "cpu").env  # the environment the demo's commands had
    return DemoRun(workdir, result.stdout, env)
