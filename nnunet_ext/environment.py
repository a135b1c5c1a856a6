"""``nnunet_ext_env``: print the shell line that makes nnU-Net find this plugin's trainers.

nnU-Net 2.8 searches the folders listed in ``nnUNet_extTrainer`` when a trainer name is not one of
its own. This plugin's folder is the repository's ``trainers/`` (re-export modules only; every
class is defined in ``nnunet_ext``). Set it next to ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results``: ``eval "$(nnunet_ext_env)"``.
"""
import argparse
import os
import sys
from pathlib import Path

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def trainers_folder() -> Path:
    """The repository's ``trainers/`` folder (the package must be installed with ``pip install -e``)."""
    folder = Path(__file__).resolve().parent.parent / "trainers"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: nnunet_ext must be installed from its repository with "
            f"'pip install -e <repository>' so that its trainers/ folder stays next to the package.")
    return folder


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    try:
        folder = trainers_folder()
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    print(f'export nnUNet_extTrainer="{folder}"')
    for name in NNUNET_PATH_VARIABLES:
        if name not in os.environ:
            print(f"# {name} is not set: nnU-Net needs it too (export {name}=/path/to/{name})", file=sys.stderr)
