"""``setup.cfg``'s metadata describes what exists: every method module of the trainer registry and every converter
is named in the description, and every converter has its console command."""
import configparser
from pathlib import Path

from nnunet_ext.dataset_conversion import CONVERTERS
from nnunet_ext.training.registry import METHOD_MODULES

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"

# how the description names each method module and converter; a new one must be added here and to the description
METHOD_NAMES = {"baseline": None, "dlkunet": "DLKUNet", "dpcnet": "DPC-Net", "godc_lfam": "GODC/LFAM",
                "scrnet": "SCRNet", "spa_dcn_net": "SPA-DCN-Net"}
DATASET_NAMES = {"lits": "LiTS", "busi": "BUSI", "busis": "BUSIS", "tn3k": "TN3K", "synapse": "Synapse",
                 "acdc": "ACDC", "kidneyus": "kidneyUS", "ussim": "US simulation", "liverus": "annotated liver US"}


def read_setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    return config


def test_description_names_every_method_and_converter():
    description = read_setup_cfg()["metadata"]["description"]
    methods = [module.rsplit(".", 1)[1] for module in METHOD_MODULES]
    unknown = [m for m in methods if m not in METHOD_NAMES] + [c for c in CONVERTERS if c not in DATASET_NAMES]
    assert not unknown, f"new method modules or converters {unknown}: name them in setup.cfg's description and here"
    names = [METHOD_NAMES[m] for m in methods if METHOD_NAMES[m]] + [DATASET_NAMES[c] for c in CONVERTERS]
    assert [n for n in names if n not in description] == [], description
    assert "evaluation" in description


def test_every_converter_has_its_console_command():
    scripts = parse_console_scripts()
    for name, module in CONVERTERS.items():
        assert scripts.get(f"nnunet_ext_convert_{name}") == f"{module}:main", name


def parse_console_scripts() -> dict:
    lines = read_setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)
