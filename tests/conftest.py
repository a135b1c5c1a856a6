"""Shared pytest fixtures."""
import multiprocessing
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnunet_ext.demo import DEFAULT_TRAINER, Demo, quick_variant
from nnunet_ext.environment import trainers_folder
from nnunet_ext.synthetic.lits import make_synthetic_lits
from tests.datasets import DATASETS


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
    """A finished ``nnunet_ext_demo`` run: its work folder, console output and nnU-Net environment; ``path`` is the
    ``PATH`` the demo itself ran with (without this interpreter's virtual environment)."""
    workdir: Path
    stdout: str
    env: dict
    path: str = ""

    @property
    def dataset(self) -> str:
        return f"Dataset{DEMO_DATASET_ID:03d}_SyntheticLiTS"

    def model_folder(self, trainer: str) -> Path:
        return self.workdir / "nnUNet_results" / self.dataset / f"{trainer}__nnUNetPlans__3d_fullres"

    def run(self, *command) -> subprocess.CompletedProcess:
        """Run a command in a new process with the demo's nnU-Net environment; it must succeed."""
        return self.run_with({}, *command)

    def run_with(self, env: dict, *command) -> subprocess.CompletedProcess:
        """``run`` with some variables of the environment replaced."""
        result = subprocess.run([str(c) for c in command], env={**self.env, **env}, capture_output=True, text=True)
        assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result


DEMO_DATASET_ID = 501

TRAINING_THREADS = {"nnUNet_def_n_proc": str(multiprocessing.cpu_count())}
"""Environment for an ``nnUNetv2_predict`` that must reproduce a final validation bit for bit. ``nnUNetv2_train`` runs
the network with one thread per core (``multiprocessing.cpu_count()``, also in its final validation), while
``nnUNetv2_predict`` runs it with ``min(nnUNet_def_n_proc, cores)`` (``predict_logits_from_preprocessed_data``), and
the test environments set ``nnUNet_def_n_proc=1``. oneDNN's convolutions sum in an order that depends on the thread
count: on the demo's DPC-Net, probabilities at 1 thread differed from the final validation's by up to 2e-4 (enough to
flip a voxel near a tie), and at the training's thread count they were identical."""


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The README's first command, run for real once per session in its seconds-long form (``--quick``): synthetic
    LiTS -> converter -> ``nnUNetv2_plan_and_preprocess`` -> ``nnUNetv2_train`` (DPC-Net, quick schedule) ->
    ``nnUNetv2_predict`` -> ``nnUNetv2_evaluate_folder``. It runs ``<venv>/bin/nnunet_ext_demo`` with a ``PATH``
    that lacks the virtual environment (as from a venv that is not activated). Later tests reuse its preprocessed
    data."""
    workdir = tmp_path_factory.mktemp("demo") / "run"
    scripts = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != scripts.resolve())
    demo_env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    result = subprocess.run([str(scripts / "nnunet_ext_demo"), "--quick", "--workdir", str(workdir),
                             "--dataset-id", str(DEMO_DATASET_ID), "--device", "cpu", "--no-compare"],
                            env={**demo_env, "PATH": path}, capture_output=True, text=True)
    assert result.returncode == 0, f"demo failed:\n{result.stdout}\n{result.stderr}"
    env = Demo(workdir, quick_variant(DEFAULT_TRAINER), DEMO_DATASET_ID, "cpu").env  # what the demo's commands had
    return DemoRun(workdir, result.stdout, env, path)


@pytest.fixture(scope="session")
def plain_checkpoint(demo_run: DemoRun) -> Path:
    """A plain nnU-Net model (``nnUNetTrainer_quick``: nnU-Net's network and loss) trained on the demo's data."""
    demo_run.run(nnunet_command("nnUNetv2_train"), DEMO_DATASET_ID, "3d_fullres", 0, "-tr", "nnUNetTrainer_quick",
                 "-device", "cpu")
    return demo_run.model_folder("nnUNetTrainer_quick") / "fold_0" / "checkpoint_final.pth"


def nnunet_command(name: str) -> str:
    """An nnU-Net console script of this interpreter's environment (works without an activated venv)."""
    return str(Path(sys.executable).parent / name)


@dataclass(frozen=True)
class PlannedDataset:
    """A synthetic twin converted by our converter and planned by nnU-Net in a private folder triple."""
    name: str
    dataset_id: int
    dataset_name: str
    configuration: str
    workdir: Path

    @property
    def raw(self) -> Path:
        return self.workdir / "nnUNet_raw" / self.dataset_name

    @property
    def preprocessed(self) -> Path:
        return self.workdir / "nnUNet_preprocessed" / self.dataset_name

    @property
    def results(self) -> Path:
        return self.workdir / "nnUNet_results" / self.dataset_name

    @property
    def env(self) -> dict:
        return {**os.environ, "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1",
                "nnUNet_raw": str(self.workdir / "nnUNet_raw"),
                "nnUNet_preprocessed": str(self.workdir / "nnUNet_preprocessed"),
                "nnUNet_results": str(self.workdir / "nnUNet_results"),
                "nnUNet_extTrainer": str(trainers_folder())}

    def model_folder(self, trainer: str, plans: str = "nnUNetPlans") -> Path:
        return self.results / f"{trainer}__{plans}__{self.configuration}"

    def run(self, *command) -> subprocess.CompletedProcess:
        """Run a command in a new process with this dataset's nnU-Net environment; it must succeed."""
        return self.run_with({}, *command)

    def run_with(self, env: dict, *command) -> subprocess.CompletedProcess:
        """``run`` with some variables of the environment replaced."""
        result = subprocess.run([str(c) for c in command], env={**self.env, **env}, capture_output=True, text=True)
        assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``planned_dataset(name)`` converts and plans ``tests.datasets.DATASETS[name]`` once per session."""
    done = {}

    def get(name: str) -> PlannedDataset:
        if name not in done:
            spec = DATASETS[name]
            workdir = tmp_path_factory.mktemp(f"planned_{name}")
            dataset = PlannedDataset(name, spec.dataset_id, f"Dataset{spec.dataset_id:03d}_{spec.dataset_name}",
                                     spec.configuration, workdir)
            release = workdir / "release"
            spec.make_synthetic(release)
            dataset.run(sys.executable, "-m", spec.converter_module, release / spec.input_subfolder,
                        "-d", spec.dataset_id, "-n", spec.dataset_name, *spec.converter_args)
            dataset.run(nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", spec.dataset_id,
                        "-c", spec.configuration, "-np", 1, "-npfp", 1, "--verify_dataset_integrity")
            done[name] = dataset
        return done[name]
    return get
