"""Plans dicts in nnU-Net 2.8's format for a given patch size, with nnU-Net's own topology rules.

``make_plans`` builds the ``nnUNetPlans.json`` content that ``nnUNetv2_plan_and_preprocess`` would write for a
dataset whose median shape fits ``patch_size``: strides and kernel sizes from nnU-Net's
``get_pool_and_conv_props`` (the function its ``ExperimentPlanner`` uses), widths ``base_features * 2**i`` capped at
nnU-Net's maxima (512 in 2D, 320 in 3D), and the architecture of the default plan (``PlainConvUNet``) or of the
residual-encoder plans (``ResidualEncoderUNet``, ``nnUNetPlannerResEnc*``: 1, 3, 4, 6, 6, ... blocks per stage).
Used by the tests (tiny widths) and by the benchmarks (nnU-Net's widths at the benchmark's patch size), so that
every network is built by its trainer's ``build_network_architecture`` from a real configuration.
"""
from __future__ import annotations

from typing import Optional, Sequence

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

ARCHITECTURES = {
    "plain": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "resenc": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
MAX_FEATURES = {2: 512, 3: 320}
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
MIN_FEATURE_MAP_EDGE = 4  # nnU-Net's ExperimentPlanner.UNet_featuremap_min_edge_length


def architecture(dim: int, patch_size: Sequence[int], arch: str = "plain", base_features: int = 32,
                 max_features: Optional[int] = None, spacing: Optional[Sequence[float]] = None,
                 max_stages: Optional[int] = None) -> dict:
    """The ``architecture`` entry of a configuration, as nnU-Net's planner derives it for ``patch_size``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    spacing = [1.0] * dim if spacing is None else list(spacing)
    _, pool_kernels, conv_kernels, _, _ = get_pool_and_conv_props(spacing, list(patch_size),
                                                                  MIN_FEATURE_MAP_EDGE, 999999)
    n_stages = len(pool_kernels) if max_stages is None else min(len(pool_kernels), max_stages)
    max_features = MAX_FEATURES[dim] if max_features is None else max_features
    conv, norm = ("Conv2d", "InstanceNorm2d") if dim == 2 else ("Conv3d", "InstanceNorm3d")
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": [min(base_features * 2 ** i, max_features) for i in range(n_stages)],
        "conv_op": f"torch.nn.modules.conv.{conv}",
        "kernel_sizes": [list(k) for k in conv_kernels[:n_stages]],
        "strides": [list(s) for s in pool_kernels[:n_stages]],
        "n_conv_per_stage_decoder": [2 if arch == "plain" else 1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.{norm}",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    if arch == "plain":
        kwargs["n_conv_per_stage"] = [2] * n_stages
    else:
        kwargs["n_blocks_per_stage"] = list(RESENC_BLOCKS_PER_STAGE[:n_stages])
    return {"network_class_name": ARCHITECTURES[arch], "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def configuration(dim: int, patch_size: Sequence[int], batch_size: int = 2, arch: str = "plain",
                  batch_dice: bool = True, **architecture_kwargs) -> dict:
    """One configuration entry (``2d`` or ``3d_fullres`` style) of a plans dict."""
    return {
        "data_identifier": f"nnUNetPlans_{dim}d", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size, "patch_size": list(patch_size), "median_image_size_in_voxels": list(patch_size),
        "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": batch_dice,
        "architecture": architecture(dim, patch_size, arch, **architecture_kwargs),
    }


def make_plans(configurations: dict, dataset_name: str = "Dataset999_Plans", plans_name: str = "nnUNetPlans") -> dict:
    """A plans dict holding ``configurations`` (name -> ``configuration(...)``)."""
    return {"dataset_name": dataset_name, "plans_name": plans_name, "configurations": configurations,
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}
