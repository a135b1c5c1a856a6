"""Cost of DPC-Net against nnU-Net's default network for the same plan.

    python -m benchmarks.dpcnet [--plans plans.json --configuration 3d_fullres] [--patch 64 64 64]
                                [--batch 2] [--device cpu|cuda] [--repeats 3]

Both networks are built exactly as the trainers build them (``nnUNetTrainer`` and
``nnUNetTrainerDPCNet``'s ``build_network_architecture``) from one configuration: a plans file's,
or by default the paper's PFE (3D, 5 levels, widths 32..512, 3x3x3, 1 channel, 2 classes).
Printed per network: parameters, forward+backward FLOPs (``torch.utils.flop_counter``: convolutions
and matmuls), median training-step time (forward + backward of the deep-supervision outputs with a
stand-in loss), peak tensor memory (and on CPU peak resident memory) of a training step, and
sliding-window throughput (patches per second: batch-1 forwards without gradients, deep supervision off,
as ``nnUNetv2_predict`` runs them), with the DPC-Net / default ratios (``benchmarks.cost``). Each network is
measured in a fresh process. Then the paper preset's parameter split next to the paper's Table 4.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.cost import print_cost_table
from nnunet_ext.evaluation.cost import measure_trainers

PAPER_PARAMETERS = {"PFE": 22.58e6, "SpaCor": 0.43e6, "SemCor": 0.09e6}
DEFAULT_CONFIGURATION = {
    "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 512],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 5,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "n_conv_per_stage": [2] * 5,
            "n_conv_per_stage_decoder": [2] * 4, "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    "patch_size": [128, 128, 128],
}


def paper_preset_split() -> dict:
    from nnunet_ext.architectures.dpcnet import dpcnet_paper_preset
    net = dpcnet_paper_preset()

    def count(*prefixes):
        return sum(p.numel() for n, p in net.named_parameters() if n.startswith(prefixes))
    return {"PFE": count("encoder.", "decoder."), "SpaCor": count("spacor.", "spa_heads."),
            "SemCor": count("semcor.", "sem_heads.")}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", help="an nnU-Net plans.json (default: the paper's PFE configuration)")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--input-channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=2, help="network outputs (classes incl. background)")
    parser.add_argument("--patch", type=int, nargs="+",
                        help="patch size (default: the plan's; 64^3 for the paper configuration on CPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def main():
    args = parse_args()
    if args.plans:
        configuration = json.load(open(args.plans))["configurations"][args.configuration]
    else:
        configuration = DEFAULT_CONFIGURATION
    plan_patch = configuration["patch_size"]
    # the paper's 128^3 patch takes minutes per step on a CPU: default to 64^3 there
    patch = args.patch or (plan_patch if args.plans or args.device == "cuda" else [64] * len(plan_patch))
    print(f"device {args.device}, {torch.get_num_threads()} threads, patch {patch}, batch {args.batch}, "
          f"{'plans ' + args.plans if args.plans else 'paper PFE configuration'}")

    plans = {"configurations": {args.configuration: {**configuration, "patch_size": patch}}}
    if args.plans:
        plans = {**json.load(open(args.plans)), **plans}
    else:
        from nnunet_ext.plans.presets import make_plans
        plans = make_plans(plans["configurations"])
    results = measure_trainers(["nnUNetTrainerDPCNet"], plans, args.configuration, args.input_channels,
                               args.classes, args.batch, args.device, args.repeats)
    print_cost_table(results)

    split = paper_preset_split()
    print(f"\nPaper preset (3D, widths 32..512, 1 channel, 2 classes){'measured':>14}{'paper':>10}")
    for part, measured in split.items():
        sign = "" if part == "PFE" else "+"
        paper = f"{sign}{PAPER_PARAMETERS[part] / 1e6:.2f}M"
        print(f"  {part:52}{sign + format(measured, ','):>14}{paper:>10}")


if __name__ == "__main__":
    main()
