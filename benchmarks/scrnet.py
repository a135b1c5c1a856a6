"""Cost of SCRNet against nnU-Net's default 2D network on the same plan, and the windowed attention's share.

    python -m benchmarks.scrnet [--patch 256 256] [--batch 4] [--window 8] [--device cpu|cuda] [--repeats 3]
                                [--stored] [--write-readme]

Both networks are built by their trainers' ``build_network_architecture`` (``nnUNetTrainer``,
``nnUNetTrainerSCRNet``: SCRM parts recomputed in the backward pass at the large stages, except the outputs of the
attention and of the dense/grouped convolutions, which are kept (the trainer's default);
with ``--stored`` also SCRNet storing every activation, ``checkpoint_scrm=False``) from nnU-Net's 2D topology for
``--patch`` (widths 32..512).

1. Cost table. Training-step time: both networks in ONE fresh process, a warm-up step each, then ``--repeats``
   steps alternating between the networks (both under the same load), median wall time and median CPU time of
   this process (all threads), ratios to nnU-Net's. Every measuring process first makes glibc keep freed memory for
   reuse (``run_in_fresh_process``: ``keep_freed_memory``, as ``nnUNetExtTrainer`` does when it trains on the CPU),
   for both networks; on the CPU one more fresh process times the steps with glibc's defaults (a row of its own).
   Each network in its own fresh process: parameters, forward+backward FLOPs (convolutions and matmuls, counted on
   one sample and multiplied by the batch, which is exact for them), peak tensor memory and peak RSS of one
   training step, sliding-window patches per second.
2. The attention: its FLOPs in SCRNet's training step by formula (``torch.utils.flop_counter`` has no formula for
   the CPU flash-attention kernel; per attention ``2 * 2 * N * T * C`` forward for ``N`` pixels, ``T`` tokens per
   window, ``C`` channels, backward twice that; a recomputing SCRM keeps the attention's output, so it is not
   computed again), and the
   median forward+backward time and peak memory of the two CCAPMs' ``WindowCrossAttention`` of every stage,
   measured alone on that stage's query/key/value shapes, as a share of SCRNet's step time.
The paper gives no parameter count (nor widths or depth), so there is none to compare with.
``--write-readme`` writes the tables into README.md's ``scrnet-cost`` block.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from benchmarks.readme_results import add_write_readme_argument, write_results
from nnunet_ext.evaluation.cost import BASELINE, build_network, set_deep_supervision
from nnunet_ext.evaluation.measure import (count_parameters, flops, fmt_bytes, make_inference_step, make_train_step,
                                           median_time, peak_memory, run_in_fresh_process, throughput)

TRAINER = "nnUNetTrainerSCRNet"
STORED = "SCRNet, SCRMs stored"


def plans_and_managers(patch, batch):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.plans.presets import configuration, make_plans
    plans = make_plans({"2d": configuration(2, list(patch), batch)})
    plans_manager = PlansManager(plans)
    return plans, plans_manager, plans_manager.get_configuration("2d")


def build(name: str, patch, batch):
    """``nnUNetTrainer``'s or ``nnUNetTrainerSCRNet``'s network as the trainer builds it, or ``STORED``."""
    plans, plans_manager, configuration_manager = plans_and_managers(patch, batch)
    if name != STORED:
        return build_network(name, plans, "2d", 1, 2)
    from nnunet_ext.architectures.scrnet import build_scrnet_from_plans
    torch.manual_seed(0)
    return build_scrnet_from_plans(plans_manager, configuration_manager, 1, 2, True, checkpoint_scrm=False)


def measure_costs(name: str, patch, batch, device, repeats) -> dict:
    """Parameters, FLOPs, peak memory and inference throughput of one network (call in a fresh process)."""
    model = build(name, patch, batch).to(device)
    x = torch.randn(batch, 1, *patch, device=device)
    memory = peak_memory(make_train_step(model, x), device)
    result = {"parameters": count_parameters(model), "flops": batch * flops(make_train_step(model, x[:1])),
              "memory": memory.bytes, "rss": memory.rss_bytes}
    set_deep_supervision(model, False)
    result["patches_per_s"] = throughput(make_inference_step(model, x[:1]), repeats=repeats, device=device)
    return result


def interleaved_step_times(names, patch, batch, device, repeats) -> dict:
    """``{name: (median wall s, median CPU s)}`` of training steps alternating between the networks."""
    x = torch.randn(batch, 1, *patch, device=device)
    steps = {name: make_train_step(build(name, patch, batch).to(device), x) for name in names}
    for step in steps.values():
        step()
    times = {name: [] for name in names}
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            if device != "cpu":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for name, v in times.items()}


def attention_share(patch, batch, window, device, repeats) -> dict:
    """The windowed attention's FLOPs by formula, and each stage's two attentions measured alone."""
    from nnunet_ext.building_blocks.feature_aggregation import WindowCrossAttention, window_sizes
    model = build(TRAINER, patch, batch)
    stages, size, attention_flops = [], list(patch), 0
    for scrm, stride in zip(model.scrms, model.strides):
        size = [s // st for s, st in zip(size, stride)]
        channels = scrm.fam.fi_high.channels
        attention = WindowCrossAttention(scrm.fam.ccapm_high.attention.heads, window)
        qkv = [torch.randn(batch, channels, *size, device=device, requires_grad=True) for _ in range(3)]

        def attention_step():
            attention(*qkv).sum().backward()
        memory = peak_memory(attention_step, device)
        tokens = window_sizes(size, window)
        forward = 4 * batch * math.prod(size) * math.prod(tokens) * channels
        attention_flops += 2 * 3 * forward  # 2 CCAPMs x (fwd + bwd)
        stages.append({"size": size, "channels": channels, "windows": tokens,
                       "time_s": 2 * median_time(attention_step, repeats=repeats, device=device),
                       "memory": memory.bytes})
    return {"sdpa_flops": attention_flops, "stages": stages}


ROWS = (("parameters", "parameters", lambda v: f"{v:,}"),
        ("fwd+bwd GFLOPs (convs, matmuls)", "flops", lambda v: f"{v / 1e9:.1f}"),
        ("training step, median wall (s)", "wall_s", lambda v: f"{v:.2f}"),
        ("training step, median CPU (s)", "cpu_s", lambda v: f"{v:.2f}"),
        ("training step, median wall, glibc malloc defaults (s)", "wall_default_s", lambda v: f"{v:.2f}"),
        ("peak tensor memory of a step", "memory", fmt_bytes),
        ("peak RSS of a step", "rss", fmt_bytes),
        ("sliding-window patches/s", "patches_per_s", lambda v: f"{v:.2f}"))
TARGETS = {"wall_s": 4.0, "cpu_s": 4.0, "memory": 3.0}


def cost_markdown(results: dict) -> str:
    names = [n for n in results if n != BASELINE]
    base = results[BASELINE]
    lines = ["| | `nnUNetTrainer` | " + " | ".join(f"`{n}` | ratio" for n in names) + " | target |",
             "|---|---|" + "---|---|" * len(names) + "---|"]
    for label, key, fmt in ROWS:
        if base.get(key) is None:
            continue
        cells = []
        for n in names:
            ratio = results[n][key] / base[key]
            cells += [fmt(results[n][key]), f"**{ratio:.2f}**" if key in TARGETS else f"{ratio:.2f}"]
        target = f"<= {TARGETS[key]:g}" if key in TARGETS else ""
        if key in TARGETS:
            target += ": met" if results[TRAINER][key] / base[key] <= TARGETS[key] else ": **missed**"
        lines.append(f"| {label} | {fmt(base[key])} | " + " | ".join(cells) + f" | {target} |")
    return "\n".join(lines)


def attention_markdown(share: dict, total_flops: float, step_s: float) -> str:
    lines = [f"Windowed attention: {share['sdpa_flops'] / 1e9:.1f} of {total_flops / 1e9:.1f} training-step GFLOPs "
             f"({100 * share['sdpa_flops'] / total_flops:.1f}%, attention by formula). Measured alone per stage "
             "(forward + backward of the two CCAPMs' attentions on the stage's shapes):", "",
             "| stage size | channels | window | 2x attention fwd+bwd (s) | peak (one) |",
             "|---|---|---|---|---|"]
    for s in share["stages"]:
        lines.append(f"| {'x'.join(map(str, s['size']))} | {s['channels']} | {'x'.join(map(str, s['windows']))} | "
                     f"{s['time_s']:.3f} | {fmt_bytes(s['memory'])} |")
    total = sum(s["time_s"] for s in share["stages"])
    lines += ["", f"Attention alone, all stages: {total:.2f} s = {100 * total / step_s:.1f}% of SCRNet's median "
                  f"training-step wall time ({step_s:.2f} s, table above; measured separately, under the same load "
                  "only approximately)."]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=2, default=[256, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=8, help="attention window (pixels per axis)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stored", action="store_true", help="also SCRNet without recomputation")
    add_write_readme_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    header = (f"device {args.device}, {torch.get_num_threads()} threads, 2d, patch {args.patch}, batch {args.batch}, "
              f"1 input channel, 2 classes; nnU-Net's 2D topology for the patch (widths 32..512)")
    if args.device == "cpu":
        header += ("; both networks with freed memory kept for reuse (keep_freed_memory, as nnunet_ext's trainers "
                   "train on the CPU) except in the glibc-defaults row")
    print(header, flush=True)
    names = [BASELINE, TRAINER] + ([STORED] if args.stored else [])
    loads = [os.getloadavg()[0]]
    results = {name: run_in_fresh_process(measure_costs, name, args.patch, args.batch, args.device, args.repeats)
               for name in names}
    loads.append(os.getloadavg()[0])
    times = run_in_fresh_process(interleaved_step_times, names, args.patch, args.batch, args.device, args.repeats)
    loads.append(os.getloadavg()[0])
    for name, (wall, cpu) in times.items():
        results[name].update(wall_s=wall, cpu_s=cpu)
    if args.device == "cpu":
        defaults = run_in_fresh_process(interleaved_step_times, names, args.patch, args.batch, args.device,
                                        args.repeats, keep_memory=False)
        loads.append(os.getloadavg()[0])
        for name, (wall, _) in defaults.items():
            results[name]["wall_default_s"] = wall
    table = cost_markdown(results)
    print(table, flush=True)
    share = run_in_fresh_process(attention_share, args.patch, args.batch, args.window, args.device, args.repeats)
    loads.append(os.getloadavg()[0])
    total_flops = results[TRAINER]["flops"] + share["sdpa_flops"]
    attention = attention_markdown(share, total_flops, results[TRAINER]["wall_s"])
    print(attention)
    load_line = ("1-minute load average " + ", ".join(f"{v:.1f}" for v in loads) + " (start, after the per-network "
                 "measurements, after the step times" + (", after the glibc-defaults step times" if
                                                        args.device == "cpu" else "") + ", at the end)")
    print(load_line)
    if args.write_readme:
        write_results("scrnet-cost", "\n\n".join([header + f"; step times from {args.repeats} alternating "
                                                  f"repeats in one process; {load_line}.", table, attention]))


if __name__ == "__main__":
    main()
