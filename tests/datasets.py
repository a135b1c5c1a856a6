"""The synthetic twin of every converter's dataset, as the end-to-end tests convert and plan it.

One entry per converter: ``planned_dataset(name)`` (``tests/conftest.py``) writes the synthetic release
with ``make_synthetic``, converts it with ``python -m <converter_module> <root>/<input_subfolder> -d ID -n NAME
<converter_args>`` into a private ``nnUNet_raw`` and runs ``nnUNetv2_plan_and_preprocess -c <configuration>
--verify_dataset_integrity``, once per test session.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Tuple

from nnunet_ext.synthetic.lits import make_synthetic_lits


@dataclass(frozen=True)
class DatasetSpec:
    dataset_id: int
    dataset_name: str
    make_synthetic: Callable[[Path], object]
    converter_module: str
    configuration: str = "2d"
    input_subfolder: str = ""
    converter_args: Tuple[str, ...] = field(default_factory=tuple)


DATASETS = {
    "lits": DatasetSpec(511, "SyntheticLiTS", make_synthetic_lits, "nnunet_ext.dataset_conversion.lits",
                        configuration="3d_fullres"),
}
