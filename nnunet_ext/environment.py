"""``nnunet_ext_env``: print the shell line that makes nnU-Net find this plugin's trainers.

nnU-Net 2.8 searches the folders listed in ``nnUNet_extTrainer`` when a trainer name is not one of
its own. This plugin's folder is the repository's ``trainers/`` (one re-export module; every class is
defined in ``nnunet_ext``), installed as the package ``nnunet_ext.trainers``: an editable install
points at the repository folder, a wheel at its copy in site-packages. Set it next to ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results``: ``eval "$(nnunet_ext_env)"``.
"""
import argparse
import os
import sys
from pathlib import Path

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def trainers_folder() -> Path:
    """The installed ``trainers/`` folder (``nnunet_ext.trainers``), editable or not."""
    import nnunet_ext.trainers
    return Path(nnunet_ext.trainers.__file__).resolve().parent


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f'export nnUNet_extTrainer="{trainers_folder()}"')
    for name in NNUNET_PATH_VARIABLES:
        if name not in os.environ:
            print(f"# {name} is not set: nnU-Net needs it too (export {name}=/path/to/{name})", file=sys.stderr)


if __name__ == "__main__":
    main()
