"""Cost of any registered trainers' networks against nnU-Net's default network on the same plan.

    python -m benchmarks.cost nnUNetTrainerDPCNet nnUNetTrainerLFAM --dim 3 --patch 32 64 64 --batch 2
    python -m benchmarks.cost nnUNetTrainerSCRNet --dim 2 --patch 256 256 --batch 4
    python -m benchmarks.cost nnUNetTrainerDPCNet --plans nnUNetPlans.json --configuration 3d_fullres

Every network is built by its trainer's ``build_network_architecture`` from one configuration: a plans file's, or
nnU-Net's topology for ``--patch`` (``nnunet_ext.plans.presets``: strides and kernels by nnU-Net's
``get_pool_and_conv_props``, widths 32 * 2^i capped at 512 in 2D / 320 in 3D, ``--arch plain|resenc``).
``nnUNetTrainer`` (nnU-Net's default network) is always measured first and is the denominator of the ratios.
Printed per network, each measured in a fresh process (``benchmarks.measure``): parameters, forward+backward FLOPs
(convolutions and matmuls), median training-step time (forward + backward of the deep-supervision outputs with a
stand-in loss), peak tensor memory and peak resident memory of one training step, and sliding-window throughput
(batch-1 forwards without gradients, deep supervision off, as ``nnUNetv2_predict`` runs them).
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch

from benchmarks.measure import (count_parameters, flops, fmt_bytes, make_inference_step, make_train_step,
                                median_time, peak_memory, run_in_fresh_process, throughput)

BASELINE = "nnUNetTrainer"
ROWS = [("parameters", "parameters", lambda v: f"{v:,}"),
        ("fwd+bwd GFLOPs", "flops", lambda v: f"{v / 1e9:.2f}"),
        ("train step (median s)", "step_s", lambda v: f"{v:.3f}"),
        ("peak tensor memory", "memory", fmt_bytes),
        ("peak RSS, train step", "rss", fmt_bytes),
        ("inference patches/s", "patches_per_s", lambda v: f"{v:.2f}")]


def trainer_class(name: str):
    if name == BASELINE:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer
    from nnunet_ext.training.registry import get_trainer
    return get_trainer(name)


def build_network(trainer_name: str, plans: dict, configuration: str, input_channels: int, num_classes: int):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(plans)
    torch.manual_seed(0)
    return trainer_class(trainer_name).build_network_architecture(
        plans_manager, plans_manager.get_configuration(configuration), input_channels, num_classes, True)


def set_deep_supervision(network: torch.nn.Module, enabled: bool) -> None:
    decoder = getattr(network, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled
    else:
        network.deep_supervision = enabled


def measure_network(trainer_name: str, plans: dict, configuration: str, input_channels: int, num_classes: int,
                    batch: int, device: str, repeats: int) -> dict:
    """All numbers of one trainer's network (call it in a fresh process: ``run_in_fresh_process``)."""
    model = build_network(trainer_name, plans, configuration, input_channels, num_classes).to(device)
    patch = plans["configurations"][configuration]["patch_size"]
    x = torch.randn(batch, input_channels, *patch, device=device)
    train_step = make_train_step(model, x)
    memory = peak_memory(train_step, device)
    result = {"parameters": count_parameters(model), "flops": flops(train_step),
              "step_s": median_time(train_step, repeats=repeats, device=device),
              "memory": memory.bytes, "rss": memory.rss_bytes}
    set_deep_supervision(model, False)
    result["patches_per_s"] = throughput(make_inference_step(model, x[:1]), repeats=repeats, device=device)
    return result


def measure_trainers(trainer_names: List[str], plans: dict, configuration: str, input_channels: int = 1,
                     num_classes: int = 2, batch: int = 2, device: str = "cpu", repeats: int = 3) -> Dict[str, dict]:
    """``nnUNetTrainer`` and every trainer in ``trainer_names``, each in a fresh process, in one run."""
    return {name: run_in_fresh_process(measure_network, name, plans, configuration, input_channels, num_classes,
                                       batch, device, repeats)
            for name in [BASELINE] + [n for n in trainer_names if n != BASELINE]}


def print_cost_table(results: Dict[str, dict]) -> None:
    """One column per network and its ratio to ``nnUNetTrainer``."""
    base = results[BASELINE]
    names = [n for n in results if n != BASELINE]
    header = f"{'':24}{BASELINE:>16}" + "".join(f"{n:>32}{'ratio':>8}" for n in names)
    print(header)
    for label, key, fmt in ROWS:
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
