"""Plans for SPA-DCN-Net: nnU-Net's 2D plan with the patch size rounded up to a multiple of 32.

SPA-DCN-Net's encoder (MobileNetV3-Small) always downsamples five times, so every patch axis must be divisible by 32;
nnU-Net's planner only makes it divisible by its own U-Net's total stride. This step copies an existing plans file
(default ``nnUNetPlans.json``, written by ``nnUNetv2_plan_and_preprocess``) to a plans file of its own
(default ``nnUNetPlans_SPADCN.json``) in which the configuration's (default ``2d``) patch size is rounded UP to the
next multiple of 32 (nnU-Net pads images smaller than the patch; rounding down would lose context). Everything else
stays: the ``data_identifier`` (the preprocessed data is reused, nothing is preprocessed again), the batch size, and
the plan's own U-Net (its total stride divides the old patch; a patch that was not a multiple of 32 had a total
stride below 32, which divides the new patch too, so ``nnUNetTrainer`` can train on the same plans for a
comparison on equal patches; this is checked).

    nnunet_ext_plan_spadcnnet -d 532                      # -> nnUNet_preprocessed/Dataset532_*/nnUNetPlans_SPADCN.json
    nnUNetv2_train 532 2d 0 -tr nnUNetTrainerSPADCNNet -p nnUNetPlans_SPADCN
    nnUNetv2_predict ... -tr nnUNetTrainerSPADCNNet -p nnUNetPlans_SPADCN -c 2d
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.architectures.spa_dcn_net import TOTAL_STRIDE

DEFAULT_SOURCE_PLANS = "nnUNetPlans"
DEFAULT_PLANS_NAME = "nnUNetPlans_SPADCN"


def round_up_patch(patch_size: Sequence[int], multiple: int = TOTAL_STRIDE) -> List[int]:
    """Every axis rounded up to the next multiple of ``multiple``."""
    return [int(math.ceil(int(s) / multiple) * multiple) for s in patch_size]


def spa_dcn_net_plans(plans: dict, configuration: str = "2d", plans_name: str = DEFAULT_PLANS_NAME) -> dict:
    """A copy of ``plans`` named ``plans_name`` whose ``configuration`` has a patch divisible by 32."""
    if configuration not in plans.get("configurations", {}):
        raise ValueError(f"the plans have no configuration {configuration!r} (have: "
                         f"{', '.join(plans.get('configurations', {}))}); plan it with "
                         f"`nnUNetv2_plan_and_preprocess -c {configuration}`")
    manager = PlansManager(plans)
    resolved = manager.get_configuration(configuration)  # resolves inherits_from
    if len(resolved.patch_size) != 2:
        raise ValueError(f"SPA-DCN-Net is 2D only, but configuration {configuration!r} has the 3D patch "
                         f"{list(resolved.patch_size)}: use the 2d configuration")
    patch = round_up_patch(resolved.patch_size)
    total_stride = np.prod(np.vstack(resolved.pool_op_kernel_sizes), axis=0)
    if any(p % s for p, s in zip(patch, total_stride)):
        raise ValueError(f"the rounded patch {patch} is not divisible by the plan's U-Net total stride "
                         f"{total_stride.tolist()}")
    new = copy.deepcopy(plans)
    new["plans_name"] = plans_name
    new["configurations"][configuration]["patch_size"] = patch
    return new


def write_spa_dcn_net_plans(dataset: str, configuration: str = "2d", source_plans: str = DEFAULT_SOURCE_PLANS,
                            plans_name: str = DEFAULT_PLANS_NAME, preprocessed: Optional[str] = None) -> Path:
    """Read ``<preprocessed>/<dataset>/<source_plans>.json``, write ``<plans_name>.json`` next to it (returned)."""
    if preprocessed is None:
        preprocessed = os.environ.get("nnUNet_preprocessed")
    if preprocessed is None:
        raise RuntimeError("nnUNet_preprocessed is not set: export the nnU-Net folder variables first")
    if plans_name == source_plans:
        raise ValueError(f"the output plans name must differ from the source plans {source_plans!r}")
    source = Path(preprocessed) / maybe_convert_to_dataset_name(dataset) / f"{source_plans}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: run `nnUNetv2_plan_and_preprocess -d {dataset} "
                                f"-c {configuration}` first")
    try:
        plans = json.loads(source.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON: {error}") from error
    new = spa_dcn_net_plans(plans, configuration, plans_name)
    target = source.with_name(f"{plans_name}.json")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(new, indent=4))
    tmp.replace(target)
    old_patch = PlansManager(plans).get_configuration(configuration).patch_size
    print(f"{target}: configuration {configuration} patch {list(old_patch)} -> "
          f"{new['configurations'][configuration]['patch_size']} (data_identifier unchanged); "
          f"train and predict with -p {plans_name}")
    return target


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_Name)")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-p", "--source_plans", default=DEFAULT_SOURCE_PLANS,
                        help=f"plans to start from (default {DEFAULT_SOURCE_PLANS})")
    parser.add_argument("-o", "--plans_name", default=DEFAULT_PLANS_NAME,
                        help=f"name of the plans written (default {DEFAULT_PLANS_NAME})")
    args = parser.parse_args(argv)
    try:
        write_spa_dcn_net_plans(args.dataset, args.configuration, args.source_plans, args.plans_name)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
