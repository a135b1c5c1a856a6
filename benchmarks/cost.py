"""Cost of any registered trainers' networks against nnU-Net's default network on the same plan.

    python -m benchmarks.cost nnUNetTrainerDPCNet nnUNetTrainerLFAM --patch 32 64 64 --batch 2
    python -m benchmarks.cost nnUNetTrainerSCRNet --patch 256 256 --batch 4
    python -m benchmarks.cost nnUNetTrainerDPCNet --plans nnUNetPlans.json --configuration 3d_fullres

Every network is built by its trainer's ``build_network_architecture`` from one configuration: a plans file's, or
nnU-Net's topology for ``--patch`` (``nnunet_ext.plans.presets``: strides and kernels by nnU-Net's
``get_pool_and_conv_props``, widths 32 * 2^i capped at 512 in 2D / 320 in 3D, ``--arch plain|resenc``).
``nnUNetTrainer`` (nnU-Net's default network) is always measured first and is the denominator of the ratios.
Printed per network, each measured in a fresh process by ``nnunet_ext.evaluation.cost`` (the measuring code of
``nnunet_ext_compare``): parameters, forward+backward FLOPs (convolutions and matmuls), median training-step time
(forward + backward of the deep-supervision outputs with a stand-in loss), peak tensor memory and peak resident memory
of one training step, and sliding-window throughput (batch-1 forwards without gradients, deep supervision off, as
``nnUNetv2_predict`` runs them).
"""
from __future__ import annotations

import argparse
import json
from typing import Dict

import torch

from nnunet_ext.evaluation.cost import BASELINE, COST_ROWS, measure_trainers


def print_cost_table(results: Dict[str, dict]) -> None:
    """One column per network and its ratio to ``nnUNetTrainer``."""
    base = results[BASELINE]
    names = [n for n in results if n != BASELINE]
    print(f"{'':24}{BASELINE:>16}" + "".join(f"{n:>32}{'ratio':>8}" for n in names))
    for label, key, fmt in COST_ROWS:
        if base[key] is None:
            continue
        cells = "".join(f"{fmt(results[n][key]):>32}{results[n][key] / base[key]:>8.2f}" for n in names)
        print(f"{label:24}{fmt(base[key]):>16}{cells}")


def plans_for(args) -> tuple:
    if args.plans:
        plans = json.load(open(args.plans))
        if args.patch:
            plans["configurations"][args.configuration]["patch_size"] = args.patch
        return plans, args.configuration
    from nnunet_ext.plans.presets import configuration, make_plans
    if not args.patch:
        raise SystemExit("error: give --patch (or --plans with --configuration)")
    name = "2d" if len(args.patch) == 2 else "3d_fullres"
    return make_plans({name: configuration(len(args.patch), args.patch, args.batch, arch=args.arch)}), name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trainers", nargs="+", help="registered trainer names (nnUNetTrainer is always added)")
    parser.add_argument("--plans", help="an nnU-Net plans.json (default: nnU-Net's topology for --patch)")
    parser.add_argument("--configuration", default="3d_fullres", help="configuration of --plans")
    parser.add_argument("--patch", type=int, nargs="+", help="patch size (overrides the plan's)")
    parser.add_argument("--arch", choices=("plain", "resenc"), default="plain", help="without --plans")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--input-channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=2, help="network outputs (classes incl. background)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    plans, configuration = plans_for(args)
    patch = plans["configurations"][configuration]["patch_size"]
    print(f"device {args.device}, {torch.get_num_threads()} threads, configuration {configuration}, patch {patch}, "
          f"batch {args.batch}, {args.input_channels} input channel(s), {args.classes} classes")
    results = measure_trainers(args.trainers, plans, configuration, args.input_channels, args.classes, args.batch,
                               args.device, args.repeats)
    print_cost_table(results)


if __name__ == "__main__":
    main()
