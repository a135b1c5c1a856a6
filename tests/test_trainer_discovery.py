"""nnU-Net finds our trainers through ``nnUNet_extTrainer``, as the real lookup does it."""
import os
import pickle
import subprocess
import sys

import pytest

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

import nnunet_ext.training.dpcnet
import nnunet_ext.training.godc_lfam
from nnunet_ext.environment import trainers_folder

# every trainer class the package defines: each must be reachable through nnUNet_extTrainer
TRAINERS = {name: obj
            for module in (nnunet_ext.training.dpcnet, nnunet_ext.training.godc_lfam)
            for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_lookup_returns_the_package_class(name, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_folder()))
    found = recursive_find_trainer_class_by_name(name)
    # the very class defined in nnunet_ext, not a copy from a module nnU-Net imported and dropped
    assert found is TRAINERS[name]
    assert pickle.loads(pickle.dumps(found)) is found


def test_every_trainer_is_covered():
    assert len(TRAINERS) == 10
    assert all(name.startswith("nnUNetTrainer") for name in TRAINERS)


def test_lookup_fails_without_the_variable(monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainerDPCNet"):
        recursive_find_trainer_class_by_name("nnUNetTrainerDPCNet")


def test_trainers_folder_holds_only_re_exports():
    for module in trainers_folder().glob("*.py"):
        source = module.read_text()
        assert "class " not in source, f"{module} defines a class; define it in nnunet_ext and re-export it"


def test_env_command_prints_the_export_line_for_a_fresh_shell():
    result = subprocess.run(["nnunet_ext_env"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f'export nnUNet_extTrainer="{trainers_folder()}"'
    # the printed line works in a fresh shell: the lookup succeeds in a new process
    script = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
              "print(f('nnUNetTrainerDPCNet').__module__)")
    shell = f'{result.stdout.strip()}; "{sys.executable}" -c "{script}"'
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    lookup = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True, env=env)
    assert lookup.stdout.strip().splitlines()[-1] == "nnunet_ext.training.dpcnet"
