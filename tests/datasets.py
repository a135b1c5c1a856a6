"""The synthetic twin of every converter's dataset, as the end-to-end tests convert and plan it.

One entry per converter: ``planned_dataset(name)`` (``tests/conftest.py``) writes the synthetic release
with ``make_synthetic``, converts it with ``python -m <converter_module> <root>/<input_subfolder> -d ID -n NAME
<converter_args>`` into a private ``nnUNet_raw`` and runs ``nnUNetv2_plan_and_preprocess -c <configuration>
--verify_dataset_integrity``, once per test session.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Tuple

from nnunet_ext.dataset_conversion import acdc, busi, synapse, tn3k
from nnunet_ext.dataset_conversion.ussim import RELEASE as USSIM_RELEASE
from nnunet_ext.synthetic.acdc import make_synthetic_acdc
from nnunet_ext.synthetic.kidneyus import make_synthetic_kidneyus
from nnunet_ext.synthetic.liverus import make_synthetic_liverus
from nnunet_ext.synthetic.lits import make_synthetic_lits
from nnunet_ext.synthetic.synapse import make_synthetic_synapse
from nnunet_ext.synthetic.ultrasound_breast_thyroid import (BUSIS_ROOT, make_synthetic_busi, make_synthetic_busis,
                                                           make_synthetic_tn3k)
from nnunet_ext.synthetic.ussim import make_synthetic_ussim


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
    "synapse": DatasetSpec(541, "SyntheticSynapse", make_synthetic_synapse, "nnunet_ext.dataset_conversion.synapse",
                           input_subfolder=synapse.RAW_DATA),
    "acdc": DatasetSpec(542, "SyntheticACDC", make_synthetic_acdc, "nnunet_ext.dataset_conversion.acdc",
                        input_subfolder=acdc.DATABASE),
    "kidneyus": DatasetSpec(531, "SyntheticKidneyUS", make_synthetic_kidneyus, "nnunet_ext.dataset_conversion.kidneyus",
                            converter_args=("--task", "capsule", "--annotator", "1")),
    "ussim": DatasetSpec(532, "SyntheticUSSim", make_synthetic_ussim, "nnunet_ext.dataset_conversion.ussim",
                         input_subfolder=USSIM_RELEASE[0], converter_args=("--subset", "AUS", "--task", "liver")),
    "liverus": DatasetSpec(533, "SyntheticLiverUS", make_synthetic_liverus, "nnunet_ext.dataset_conversion.liverus",
                           converter_args=("--task", "liver")),
    "busi": DatasetSpec(521, "SyntheticBUSI", make_synthetic_busi, "nnunet_ext.dataset_conversion.busi",
                        input_subfolder=busi.ROOT_FOLDER),
    "busis": DatasetSpec(522, "SyntheticBUSIS", make_synthetic_busis, "nnunet_ext.dataset_conversion.busis",
                         input_subfolder=BUSIS_ROOT),
    "tn3k": DatasetSpec(523, "SyntheticTN3K", make_synthetic_tn3k, "nnunet_ext.dataset_conversion.tn3k",
                        input_subfolder=tn3k.ROOT_FOLDER),
}
