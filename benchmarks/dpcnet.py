"""Cost of DPC-Net against nnU-Net's default network for the same plan.

    python benchmarks/dpcnet.py [--plans plans.json --configuration 3d_fullres] [--patch 64 64 64]
                                [--batch 2] [--device cpu|cuda] [--repeats 3]

Both networks are built exactly as the trainers build them (``nnUNetTrainer`` and
``nnUNetTrainerDPCNet``'s ``build_network_architecture``) from one configuration: a plans file's,
or by default the paper's PFE (3D, 5 levels, widths 32..512, 3x3x3, 1 channel, 2 classes).
Printed per network: parameters, forward+backward FLOPs (``torch.utils.flop_counter``: convolutions
and matmuls), median training-step time (forward + backward of the deep-supervision outputs with a
stand-in loss), peak tensor memory (and on CPU peak resident memory) of a training step, and sliding-window throughput (patches per second:
batch-1 forwards without gradients, deep supervision off, as ``nnUNetv2_predict`` runs them),
with the DPC-Net / default ratios. Each network is measured in a fresh process. Then the paper
preset's parameter split next to the paper's Table 4.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import (count_parameters, flops, fmt_bytes, make_inference_step, make_train_step,  # noqa: E402
                     median_time, peak_memory, run_in_fresh_process, throughput)

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


def build(network: str, configuration: dict, input_channels: int, num_classes: int):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    from nnunet_ext.training.dpcnet import nnUNetTrainerDPCNet
    trainer = nnUNetTrainerDPCNet if network == "DPC-Net" else nnUNetTrainer
    torch.manual_seed(0)
    return trainer.build_network_architecture(None, ConfigurationManager(configuration), input_channels,
                                              num_classes, True)


def measure_case(network: str, configuration: dict, input_channels: int, num_classes: int, patch: list,
                 batch: int, device: str, repeats: int) -> dict:
    """All numbers of one network (runs in its own process)."""
    torch.set_num_threads(torch.get_num_threads())
    model = build(network, configuration, input_channels, num_classes).to(device)
    x = torch.randn(batch, input_channels, *patch, device=device)
    train_step = make_train_step(model, x)
    memory = peak_memory(train_step, device)
    result = {"parameters": count_parameters(model), "flops": flops(train_step),
              "step_s": median_time(train_step, repeats=repeats, device=device),
              "memory": memory.bytes, "memory_method": memory.method, "rss": memory.rss_bytes}
    model.decoder.deep_supervision = False
    patch_forward = make_inference_step(model, x[:1])
    result["patches_per_s"] = throughput(patch_forward, repeats=repeats, device=device)
    return result


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

    results = {network: run_in_fresh_process(measure_case, network, configuration, args.input_channels,
                                             args.classes, patch, args.batch, args.device, args.repeats)
               for network in ("nnU-Net default", "DPC-Net")}
    base, dpc = results["nnU-Net default"], results["DPC-Net"]
    rows = [("parameters", "parameters", lambda v: f"{v:,}"),
            ("fwd+bwd GFLOPs", "flops", lambda v: f"{v / 1e9:.1f}"),
            ("train step (median s)", "step_s", lambda v: f"{v:.3f}"),
            ("peak tensor memory, train", "memory", fmt_bytes),
            ("inference patches/s", "patches_per_s", lambda v: f"{v:.2f}")]
    print(f"\n{'':26}{'nnU-Net default':>18}{'DPC-Net':>18}{'DPC / default':>16}")
    if dpc["rss"] is not None:
        rows.insert(4, ("peak RSS, train step", "rss", fmt_bytes))
    for label, key, fmt in rows:
        print(f"{label:26}{fmt(base[key]):>18}{fmt(dpc[key]):>18}{dpc[key] / base[key]:>16.3f}")
    print(f"(tensor memory: {dpc['memory_method']})")

    split = paper_preset_split()
    print(f"\nPaper preset (3D, widths 32..512, 1 channel, 2 classes){'measured':>14}{'paper':>10}")
    for part, measured in split.items():
        sign = "" if part == "PFE" else "+"
        print(f"  {part:52}{sign + format(measured, ','):>14}{sign + format(PAPER_PARAMETERS[part] / 1e6, '.2f') + 'M':>10}")


if __name__ == "__main__":
    main()
