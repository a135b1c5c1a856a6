"""nnU-Net finds our trainers through ``nnUNet_extTrainer`` from an editable install, as the real lookup does it.
(The per-trainer lookup is part of the contract sweep, ``test_trainer_contract.py``; the wheel install in
``test_wheel_install.py``.)"""
import os
import subprocess
import sys

import pytest

from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_ext.environment import trainers_folder


def test_lookup_fails_without_the_variable(monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainerDPCNet"):
        recursive_find_trainer_class_by_name("nnUNetTrainerDPCNet")


def test_trainers_folder_holds_only_re_exports():
    modules = sorted(p.name for p in trainers_folder().glob("*.py"))
    assert modules == ["__init__.py", "nnunet_ext_trainers.py"]
    for module in trainers_folder().glob("*.py"):
        source = module.read_text()
        assert "class " not in source, f"{module} defines a class; define it in nnunet_ext and re-export it"


def test_env_command_prints_the_export_line_for_a_fresh_shell():
    result = subprocess.run([sys.executable, "-m", "nnunet_ext.environment"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == f'export nnUNet_extTrainer="{trainers_folder()}"'
    # the printed line works in a fresh shell: the lookup succeeds in a new process
    script = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
              "print(f('nnUNetTrainerDPCNet').__module__)")
    shell = f'{result.stdout.strip()}; "{sys.executable}" -c "{script}"'
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    lookup = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True, env=env)
    assert lookup.stdout.strip().splitlines()[-1] == "nnunet_ext.training.dpcnet"
