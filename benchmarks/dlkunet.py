"""DLKUNet S/M/L: the paper configuration against Table 1, and cost against nnU-Net's default 2D network.

    python -m benchmarks.dlkunet [--patch 224 224] [--batch 2] [--classes 9] [--device cpu|cuda] [--repeats 3]
                                 [--write-readme]

1. Paper configuration (``create_dlkunet``: 2D, 1 input channel, 9 classes, no deep supervision): parameters and
   forward multiply-accumulates of one 224x224 image (``torch.utils.flop_counter``, FLOPs / 2) next to Table 1.
   Table 1's "FLOPs" are torchinfo's "mult-adds" (the authors call ``torchinfo.summary``): weights x output pixels
   (+ bias) per conv, which counts a k2 s2 transposed conv 4x (each output pixel sees one of its 4 taps);
   ``torchinfo_mult_adds`` repeats that convention to show the match.
2. ``benchmarks.cost`` on one 2D plan with nnU-Net's topology for ``--patch`` (``nnunet_ext.plans.presets``): the
   networks of ``nnUNetTrainerDLKUNetS/M/L`` (variant widths, depth bounded by the plan, deep-supervision heads)
   and of ``nnUNetTrainer``, each in a fresh process: parameters, forward+backward FLOPs, training-step time,
   peak memory, sliding-window throughput, ratios to nnU-Net's network.

``--write-readme`` writes both tables into the README block ``dlkunet-cost``.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.cost import print_cost_table
from benchmarks.readme_results import add_write_readme_argument, write_results
from nnunet_ext.evaluation.cost import COST_ROWS, cost_table, measure_trainers
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


def paper_table() -> list:
    """Rows ``[variant, parameters, Table 1 parameters, GMACs, torchinfo G mult-adds, Table 1 "GFLOPs"]``."""
    rows = []
    for variant, (paper_params, paper_flops) in PAPER_TABLE_1.items():
        params, macs, mult_adds = paper_configuration(variant)
        rows.append([f"DLKUNet-{variant}", f"{params:,}", f"{paper_params / 1e6:.2f}M", f"{macs / 1e9:.2f}",
                     f"{mult_adds / 1e9:.2f}", f"{paper_flops / 1e9:.2f}G"])
    return rows


PAPER_HEAD = ["paper configuration", "parameters", "Table 1", "GMACs 224x224", "torchinfo G", "Table 1"]


def markdown_table(head: list, rows: list) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=2, default=[224, 224], help="2D patch (the paper's 224x224)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=9, help="network outputs (Synapse: 9)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    add_write_readme_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = paper_table()
    widths = [22, 14, 10, 16, 14, 10]
    for row in [PAPER_HEAD] + rows:
        print(row[0].ljust(widths[0]) + "".join(cell.rjust(width) for cell, width in zip(row[1:], widths[1:])))
    from nnunet_ext.plans.presets import configuration, make_plans
    plans = make_plans({"2d": configuration(2, args.patch, args.batch)})
    strides = plans['configurations']['2d']['architecture']['arch_kwargs']['strides']
    setting = (f"device {args.device}, {torch.get_num_threads()} threads, 2d plan for patch {args.patch} "
               f"(strides {strides}), batch {args.batch}, {args.classes} classes")
    print(f"\n{setting}")
    results = measure_trainers(TRAINERS, plans, "2d", 1, args.classes, args.batch, args.device, args.repeats)
    print_cost_table(results)
    if args.write_readme:
        cost_head = ["network"] + [title for title, _, _ in COST_ROWS]
        write_results("dlkunet-cost", "\n\n".join([
            "Paper configuration (2D, 1 input channel, 9 classes, no deep supervision) on one 224x224 image; Table "
            "1's \"FLOPs\" are torchinfo's mult-adds (a k2 s2 transposed conv counted 4x):",
            markdown_table(PAPER_HEAD, rows),
            f"Networks of the trainers on nnU-Net's topology ({setting}), each in a fresh process, in one run; "
            f"ratios to nnU-Net's default network (`nnUNetTrainer`):",
            markdown_table(cost_head, cost_table(results))]))


if __name__ == "__main__":
    main()
