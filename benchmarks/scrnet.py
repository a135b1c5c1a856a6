"""Cost of SCRNet against nnU-Net's default 2D network on the same plan, and the windowed attention's share.

    python -m benchmarks.scrnet [--patch 256 256] [--batch 4] [--window 8] [--device cpu|cuda] [--repeats 3]

1. Cost table (``benchmarks.cost``): ``nnUNetTrainer`` vs ``nnUNetTrainerSCRNet`` (SCRM parts recomputed in the
   backward pass, the trainer's default) and with ``--stored`` SCRNet storing them (``checkpoint_scrm=False``), from
   nnU-Net's 2D topology for ``--patch`` (widths 32..512), each in a fresh process: parameters, forward+backward
   FLOPs, median training-step time, peak tensor / resident memory of a step, sliding-window patches per second.
2. The attention: its FLOPs in SCRNet's training step by formula (``torch.utils.flop_counter`` has no formula for
   the CPU flash-attention kernel; per attention ``2 * 2 * N * T * C`` forward for ``N`` pixels, ``T`` tokens per
   window, ``C`` channels, backward twice that, plus the recomputed forward), and
   the median forward+backward time and peak memory of the two CCAPMs' ``WindowCrossAttention`` of every stage,
   measured alone on that stage's query/key/value shapes, as a share of SCRNet's step time of the cost table.
The paper gives no parameter count (nor widths or depth), so there is none to compare with.
"""
from __future__ import annotations

import argparse
import math

import torch

from benchmarks.cost import print_cost_table
from nnunet_ext.evaluation.cost import measure_trainers, set_deep_supervision
from nnunet_ext.evaluation.measure import (count_parameters, flops, fmt_bytes, make_inference_step, make_train_step,
                                median_time, peak_memory, run_in_fresh_process, throughput)

TRAINER = "nnUNetTrainerSCRNet"
NO_RECOMPUTATION = "SCRNet, SCRMs stored"


def plans_and_managers(patch, batch):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.plans.presets import configuration, make_plans
    plans = make_plans({"2d": configuration(2, list(patch), batch)})
    plans_manager = PlansManager(plans)
    return plans, plans_manager, plans_manager.get_configuration("2d")


def build_scrnet(patch, batch, **kwargs):
    from nnunet_ext.architectures.scrnet import build_scrnet_from_plans
    _, plans_manager, configuration_manager = plans_and_managers(patch, batch)
    torch.manual_seed(0)
    return build_scrnet_from_plans(plans_manager, configuration_manager, 1, 2, True, **kwargs)


def measure_scrnet_variant(patch, batch, device, repeats, **kwargs) -> dict:
    """The cost table's numbers for SCRNet built with ``kwargs`` (as ``benchmarks.cost.measure_network``)."""
    model = build_scrnet(patch, batch, **kwargs).to(device)
    x = torch.randn(batch, 1, *patch, device=device)
    step = make_train_step(model, x)
    memory = peak_memory(step, device)
    result = {"parameters": count_parameters(model), "flops": flops(step),
              "step_s": median_time(step, repeats=repeats, device=device), "memory": memory.bytes,
              "rss": memory.rss_bytes}
    set_deep_supervision(model, False)
    result["patches_per_s"] = throughput(make_inference_step(model, x[:1]), repeats=repeats, device=device)
    return result


def attention_share(patch, batch, window, device, repeats, step_s: float) -> dict:
    """SDPA FLOPs in SCRNet's step, and each stage's two window attentions measured alone."""
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_ext.building_blocks.feature_aggregation import WindowCrossAttention, window_sizes
    model = build_scrnet(patch, batch, window_size=window).to(device)
    x = torch.randn(batch, 1, *patch, device=device)
    step = make_train_step(model, x)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" not in str(op))
    attention_flops = 0
    stages, size = [], list(patch)
    for scrm, stride in zip(model.scrms, model.strides):
        size = [s // st for s, st in zip(size, stride)]
        ccapm = scrm.fam.ccapm_high
        channels = ccapm.fi_query.project.out_channels
        attention = WindowCrossAttention(ccapm.attention.heads, window)
        qkv = [torch.randn(batch, channels, *size, device=device, requires_grad=True) for _ in range(3)]

        def attention_step():
            out = attention(*qkv)
            out.sum().backward()
        memory = peak_memory(attention_step, device)
        tokens = window_sizes(size, window)
        attention_flops += 2 * 4 * (4 * batch * math.prod(size) * math.prod(tokens)
                                    * channels)  # 2 CCAPMs x (fwd + recomputed fwd + 2x fwd bwd) x forward
        stages.append({"size": size, "channels": channels, "windows": window_sizes(size, window),
                       "time_s": 2 * median_time(attention_step, repeats=repeats, device=device),
                       "memory": memory.bytes})
    return {"total_flops": counted + attention_flops, "sdpa_flops": attention_flops, "step_s": step_s,
            "stages": stages}


def print_attention_share(share: dict) -> None:
    print(f"\nwindow attention: {share['sdpa_flops'] / 1e9:.2f} of {share['total_flops'] / 1e9:.2f} fwd+bwd GFLOPs "
          f"of SCRNet's step ({100 * share['sdpa_flops'] / share['total_flops']:.1f}%; attention by formula)")
    print(f"{'stage size':>12}{'channels':>10}{'window':>10}{'2x attention fwd+bwd (s)':>28}{'peak (one)':>14}")
    for s in share["stages"]:
        print(f"{'x'.join(map(str, s['size'])):>12}{s['channels']:>10}{'x'.join(map(str, s['windows'])):>10}"
              f"{s['time_s']:>28.3f}{fmt_bytes(s['memory']):>14}")
    total = sum(s["time_s"] for s in share["stages"])
    print(f"attention alone, all stages: {total:.3f} s = {100 * total / share['step_s']:.1f}% of SCRNet's "
          f"training step ({share['step_s']:.3f} s, cost table)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=2, default=[256, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=8, help="attention window (pixels per axis)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stored", action="store_true", help="also SCRNet without recomputation")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"device {args.device}, {torch.get_num_threads()} threads, 2d, patch {args.patch}, batch {args.batch}, "
          f"1 input channel, 2 classes")
    plans, _, _ = plans_and_managers(args.patch, args.batch)
    results = measure_trainers([TRAINER], plans, "2d", 1, 2, args.batch, args.device, args.repeats)
    if args.stored:
        results[NO_RECOMPUTATION] = run_in_fresh_process(measure_scrnet_variant, args.patch, args.batch, args.device,
                                                         args.repeats, checkpoint_scrm=False)
    print_cost_table(results)
    print_attention_share(run_in_fresh_process(attention_share, args.patch, args.batch, args.window, args.device,
                                               args.repeats, results[TRAINER]["step_s"]))


if __name__ == "__main__":
    main()
