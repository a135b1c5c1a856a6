"""The tiny plans every trainer and network test builds from (``nnunet_ext.plans.presets``, nnU-Net's topology).

2d: 64x64 patch (divisible by 32 for fixed-depth encoders), 3d_fullres: 16x32x32; widths 4, 8, 16, ... capped at 32;
at most 4 stages; plain (``PlainConvUNet``) or residual-encoder (``ResidualEncoderUNet``) architecture. The dict is
what a trainer receives from nnU-Net (with ``continue_training``, which nnU-Net adds before instantiating).
"""
from nnunet_ext.plans.presets import configuration, make_plans

TINY_PATCH = {"2d": [64, 64], "3d_fullres": [16, 32, 32]}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}


def tiny_plans(arch: str = "plain", batch_dice: bool = True) -> dict:
    configurations = {name: configuration(len(patch), patch, arch=arch, batch_dice=batch_dice, base_features=4,
                                          max_features=32, max_stages=4)
                      for name, patch in TINY_PATCH.items()}
    plans = make_plans(configurations, dataset_name="Dataset999_Tiny")
    plans["continue_training"] = False
    return plans
