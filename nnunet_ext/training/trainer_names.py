"""The names of the registered trainers, readable without importing torch (``nnunet_ext_demo`` checks ``--trainer``
against them before any work starts, and ``--help`` lists them).

``nnunet_ext.training.registry.TRAINERS`` is the source of truth, but building it imports every method module and with
them torch and nnU-Net (about 6 s on 2 CPU cores). ``TRAINER_NAMES`` is a committed copy of its keys;
``tests/test_demo.py`` proves the two equal. After registering a trainer, regenerate it with

    python -m nnunet_ext.training.trainer_names
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Iterable, List

TRAINER_NAMES = (
    "nnUNetTrainerDLKUNetL",
    "nnUNetTrainerDLKUNetLDynamicLoss",
    "nnUNetTrainerDLKUNetLDynamicLoss_quick",
    "nnUNetTrainerDLKUNetLPaper",
    "nnUNetTrainerDLKUNetLPhaseLoss",
    "nnUNetTrainerDLKUNetLPhaseLoss_quick",
    "nnUNetTrainerDLKUNetL_quick",
    "nnUNetTrainerDLKUNetM",
    "nnUNetTrainerDLKUNetMDynamicLoss",
    "nnUNetTrainerDLKUNetMDynamicLoss_quick",
    "nnUNetTrainerDLKUNetMPaper",
    "nnUNetTrainerDLKUNetMPhaseLoss",
    "nnUNetTrainerDLKUNetMPhaseLoss_quick",
    "nnUNetTrainerDLKUNetM_quick",
    "nnUNetTrainerDLKUNetS",
    "nnUNetTrainerDLKUNetSDynamicLoss",
    "nnUNetTrainerDLKUNetSDynamicLoss_quick",
    "nnUNetTrainerDLKUNetSPaper",
    "nnUNetTrainerDLKUNetSPhaseLoss",
    "nnUNetTrainerDLKUNetSPhaseLoss_quick",
    "nnUNetTrainerDLKUNetS_quick",
    "nnUNetTrainerDPCNet",
    "nnUNetTrainerDPCNetPaper",
    "nnUNetTrainerDPCNet_demo",
    "nnUNetTrainerDPCNet_quick",
    "nnUNetTrainerGODC",
    "nnUNetTrainerGODCOnly",
    "nnUNetTrainerGODC_quick",
    "nnUNetTrainerLFAM",
    "nnUNetTrainerLFAMGODC",
    "nnUNetTrainerLFAMGODCCoarse",
    "nnUNetTrainerLFAMGODCPaper",
    "nnUNetTrainerLFAMGODC_quick",
    "nnUNetTrainerSCRNet",
    "nnUNetTrainerSCRNetPaper",
    "nnUNetTrainerSCRNet_quick",
    "nnUNetTrainerSPADCNNet",
    "nnUNetTrainerSPADCNNetLCNAfterSPA",
    "nnUNetTrainerSPADCNNetLCNBeforeSPA",
    "nnUNetTrainerSPADCNNetNoLCN",
    "nnUNetTrainerSPADCNNetPaper",
    "nnUNetTrainerSPADCNNet_quick",
    "nnUNetTrainer_demo",
    "nnUNetTrainer_quick",
)


def close_matches(name: str, names: Iterable[str] = TRAINER_NAMES) -> List[str]:
    """Up to three registered names closest to ``name`` (``difflib``, similarity >= 0.6), best first."""
    return difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)


def unknown_trainer_message(name: str, names: Iterable[str] = TRAINER_NAMES) -> str:
    """What to tell a user who asked for the unregistered trainer ``name``: the close matches, else every name."""
    names = list(names)
    close = close_matches(name, names)
    hint = f"did you mean {', '.join(close)}?" if close else f"registered: {', '.join(names)}"
    return f"unknown trainer {name!r}; {hint}"


def write_index(path: Path = Path(__file__)) -> bool:
    """Rewrite ``TRAINER_NAMES`` in this module's source from the registry; True if it changed."""
    from nnunet_ext.training.registry import TRAINERS
    source = path.read_text()
    listing = "".join(f'    "{name}",\n' for name in TRAINERS)
    updated = re.sub(r"^TRAINER_NAMES = \(\n.*?^\)\n", f"TRAINER_NAMES = (\n{listing})\n", source,
                     count=1, flags=re.MULTILINE | re.DOTALL)
    if updated != source:
        path.write_text(updated)
    return updated != source


if __name__ == "__main__":
    print("updated" if write_index() else "up to date", Path(__file__))
