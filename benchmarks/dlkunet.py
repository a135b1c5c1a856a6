"""DLKUNet S/M/L: the paper configuration against Table 1, and cost against nnU-Net's default 2D network.

    python -m benchmarks.dlkunet [--patch 224 224] [--batch 2] [--classes 9] [--device cpu|cuda] [--repeats 3]

1. Paper configuration (``create_dlkunet``: 2D, 1 input channel, 9 classes, no deep supervision): parameters and
   forward multiply-accumulates of one 224x224 image (``torch.utils.flop_counter``, FLOPs / 2) next to Table 1.
   Table 1's "FLOPs" are torchinfo's "mult-adds" (the authors call ``torchinfo.summary``): weights x output pixels
   (+ bias) per conv, which counts a k2 s2 transposed conv 4x (each output pixel sees one of its 4 taps);
   ``torchinfo_mult_adds`` repeats that convention to show the match.
2. ``benchmarks.cost`` on one 2D plan with nnU-Net's topology for ``--patch`` (``nnunet_ext.plans.presets``): the
   networks of ``nnUNetTrainerDLKUNetS/M/L`` (variant widths, depth bounded by the plan, deep-supervision heads)
   and of ``nnUNetTrainer``, each in a fresh process: parameters, forward+backward FLOPs, training-step time,
   peak memory, sliding-window throughput, ratios to nnU-Net's network.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.cost import print_cost_table
from nnunet_ext.evaluation.cost import measure_trainers
from nnunet_ext.evaluation.measure import count_parameters, flops

PAPER_TABLE_1 = {"S": (1.13e6, 15.95e9), "M": (4.49e6, 22.84e9), "L": (17.70e6, 29.64e9)}  # params, "FLOPs"
TRAINERS = [f"nnUNetTrainerDLKUNet{variant}" for variant in PAPER_TABLE_1]


def torchinfo_mult_adds(model: nn.Module, x: torch.Tensor) -> int:
    """torchinfo's "Total mult-adds" of the convolutions: (weights x output pixels) + bias x output pixels."""
    total = 0

    def hook(module, _, out):
        nonlocal total
        pixels = out[0, 0].numel()
        total += module.weight.numel() * pixels + (out[0].numel() if module.bias is not None else 0)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return total


def paper_configuration(variant: str) -> tuple:
    """Parameters, forward MACs and torchinfo mult-adds of the paper's DLKUNet ``variant`` on one 1x224x224 image."""
    from nnunet_ext.architectures.dlkunet import create_dlkunet
    model = create_dlkunet(variant).eval()
    x = torch.randn(1, 1, 224, 224)

    def forward():
        with torch.no_grad():
            model(x)
    return count_parameters(model), flops(forward) // 2, torchinfo_mult_adds(model, x)


def print_paper_table() -> None:
    print(f"{'paper configuration':22}{'parameters':>14}{'Table 1':>10}{'GMACs 224x224':>16}"
          f"{'torchinfo G':>14}{'Table 1':>10}")
    for variant, (paper_params, paper_flops) in PAPER_TABLE_1.items():
        params, macs, mult_adds = paper_configuration(variant)
        print(f"{'DLKUNet-' + variant:22}{params:>14,}{paper_params / 1e6:>9.2f}M{macs / 1e9:>16.2f}"
              f"{mult_adds / 1e9:>14.2f}{paper_flops / 1e9:>9.2f}G")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=2, default=[224, 224], help="2D patch (the paper's 224x224)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=9, help="network outputs (Synapse: 9)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    print_paper_table()
    from nnunet_ext.plans.presets import configuration, make_plans
    plans = make_plans({"2d": configuration(2, args.patch, args.batch)})
    print(f"\ndevice {args.device}, {torch.get_num_threads()} threads, 2d plan for patch {args.patch} "
          f"(strides {plans['configurations']['2d']['architecture']['arch_kwargs']['strides']}), batch {args.batch}, "
          f"{args.classes} classes")
    print_cost_table(measure_trainers(TRAINERS, plans, "2d", 1, args.classes, args.batch, args.device, args.repeats))


if __name__ == "__main__":
    main()
