"""Cost of DPC-Net against nnU-Net's default network for the same plan, and the patch each fits in a memory budget.

    python -m benchmarks.dpcnet [--patch 32 64 64] [--stages 4] [--batch 2] [--repeats 5] [--rss-runs 3]
                                [--budget-gb 8] [--device cpu|cuda] [--write-readme]

Both networks are built exactly as the trainers build them (``nnUNetTrainer`` and ``nnUNetTrainerDPCNet``'s
``build_network_architecture``) from one nnU-Net configuration (``nnunet_ext.plans.presets``: nnU-Net's topology
for ``--patch``, at most ``--stages`` stages; default 3D, 4 stages 32..256, 32x64x64, batch 2). Printed per network,
with the DPC-Net / nnU-Net ratio:

- parameters and forward+backward FLOPs (``torch.utils.flop_counter``: convolutions and matmuls);
- training-step time (forward + backward of all deep-supervision outputs with a stand-in loss), wall and CPU time
  (``time.process_time``, steadier on a loaded machine), medians over ``--repeats`` steps that alternate between the
  two networks in one fresh process (both sides under the same load). That process first makes glibc keep freed
  memory for reuse (``run_in_fresh_process``: ``keep_freed_memory``, as ``nnUNetExtTrainer`` does when it trains on
  the CPU), for both networks; on the CPU one more fresh process times the steps with glibc's defaults (a row of its
  own: every large tensor is then mapped and zeroed afresh by the kernel, which costs DPC-Net's extra tensors more);
- peak tensor memory and peak resident memory (RSS) of one training step, each network in a fresh process; the RSS
  (glibc's heap after the first step: the tensors plus what the allocator could not reuse, which varies from process
  to process by up to a few hundred MiB) is the median of ``--rss-runs`` processes per network, with the range;
- sliding-window throughput (batch-1 forwards without gradients, deep supervision off, as ``nnUNetv2_predict``
  runs them), alternating like the step times;
- the largest cubic 3d_fullres patch (edge a multiple of the plan's total stride) whose training step fits in
  ``--budget-gb`` of tensor memory at the plan's batch size, from the peak tensor memory measured at the plan's patch
  and at half its voxels (a linear fit ``fixed + per_voxel * voxels``; same network topology; on a GPU add the
  CUDA context and cuDNN workspaces to the budget).

Then the paper preset's parameter split next to the paper's Table 4. ``--write-readme`` writes the table into the
README block ``dpcnet-cost``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.readme_results import add_write_readme_argument, write_results
from nnunet_ext.evaluation.cost import BASELINE, build_network, set_deep_supervision
from nnunet_ext.evaluation.measure import (count_parameters, flops, make_inference_step, make_train_step, peak_memory,
                                           run_in_fresh_process)
from nnunet_ext.plans.presets import configuration, make_plans

DPCNET = "nnUNetTrainerDPCNet"
TRAINERS = (BASELINE, DPCNET)
PAPER_PARAMETERS = {"PFE": 22.58e6, "SpaCor": 0.43e6, "SemCor": 0.09e6}
MiB = 2 ** 20


def plans_for(patch, stages: int, batch: int) -> dict:
    return make_plans({"3d_fullres" if len(patch) == 3 else "2d":
                       configuration(len(patch), patch, batch, max_stages=stages)})


def _build(trainer: str, plans: dict, device: str):
    name = next(iter(plans["configurations"]))
    return build_network(trainer, plans, name, 1, 2).to(device)


def memory_case(trainer: str, plans: dict, batch: int, device: str, count_flops: bool = True) -> dict:
    """Parameters, FLOPs and peak memory of one training step (run it in a fresh process)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model = _build(trainer, plans, device)
    patch = next(iter(plans["configurations"].values()))["patch_size"]
    step = make_train_step(model, torch.randn(batch, 1, *patch, device=device))
    memory = peak_memory(step, device)
    return {"parameters": count_parameters(model), "flops": flops(step) if count_flops else None,
            "memory": memory.bytes, "rss": memory.rss_bytes}


def interleaved_times(plans: dict, batch: int, device: str, repeats: int) -> dict:
    """Median wall and CPU time of a training step and inference throughput of both networks, alternating the
    networks step by step in this process (run it in a fresh one)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    patch = next(iter(plans["configurations"].values()))["patch_size"]
    x = torch.randn(batch, 1, *patch, device=device)
    models = {t: _build(t, plans, device) for t in TRAINERS}
    runs = {"step": {t: make_train_step(m, x) for t, m in models.items()}}
    samples = {(kind, t): [] for kind in ("step", "infer") for t in TRAINERS}
    for kind in ("step", "infer"):
        if kind == "infer":
            for model in models.values():
                set_deep_supervision(model, False)
            runs["infer"] = {t: make_inference_step(m, x[:1]) for t, m in models.items()}
        for t in TRAINERS:  # warm-up
            runs[kind][t]()
        for _ in range(repeats):
            for t in TRAINERS:
                if device == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter(), time.process_time()
                runs[kind][t]()
                if device == "cuda":
                    torch.cuda.synchronize()
                samples[kind, t].append((time.perf_counter() - wall, time.process_time() - cpu))
    result = {t: {} for t in TRAINERS}
    for t in TRAINERS:
        result[t]["step_wall"] = statistics.median(w for w, _ in samples["step", t])
        result[t]["step_cpu"] = statistics.median(c for _, c in samples["step", t])
        result[t]["patches_per_s"] = 1 / statistics.median(w for w, _ in samples["infer", t])
    return result


def largest_cubic_patch(fixed: float, per_voxel: float, budget: float, multiple: int) -> int:
    """Largest edge ``n`` (a multiple of ``multiple``) with ``fixed + per_voxel * n^3 <= budget``."""
    edge = int(max(0.0, (budget - fixed) / per_voxel) ** (1 / 3)) // multiple * multiple
    while fixed + per_voxel * (edge + multiple) ** 3 <= budget:
        edge += multiple
    return edge


def paper_preset_split() -> dict:
    from nnunet_ext.architectures.dpcnet import dpcnet_paper_preset
    net = dpcnet_paper_preset()

    def count(*prefixes):
        return sum(p.numel() for n, p in net.named_parameters() if n.startswith(prefixes))
    return {"PFE": count("encoder.", "decoder."), "SpaCor": count("spacor.", "spa_heads."),
            "SemCor": count("semcor.", "sem_heads.")}


def cost_markdown(results: dict, patches: dict, header: str) -> str:
    base, dpc = results[BASELINE], results[DPCNET]
    rows = [("parameters", "parameters", lambda v: f"{v:,}"),
            ("fwd+bwd GFLOPs", "flops", lambda v: f"{v / 1e9:.1f}"),
            ("train step, wall (median s)", "step_wall", lambda v: f"{v:.2f}"),
            ("train step, CPU time (median s)", "step_cpu", lambda v: f"{v:.2f}"),
            ("train step, wall, glibc defaults (median s)", "step_wall_default", lambda v: f"{v:.2f}"),
            ("peak tensor memory, train step", "memory", lambda v: f"{v / MiB:.0f} MiB"),
            ("peak RSS, train step (median of processes)", "rss", lambda v: f"{v / MiB:.0f} MiB"),
            ("peak RSS, range over processes", "rss_range", lambda v: f"{v[0] / MiB:.0f}-{v[1] / MiB:.0f} MiB"),
            ("inference patches/s", "patches_per_s", lambda v: f"{v:.2f}")]
    lines = [header, "", "| | nnU-Net's network | DPC-Net | DPC-Net / nnU-Net |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        if key not in dpc:  # the glibc-defaults row is measured on the CPU only
            continue
        ratio = f"{dpc[key] / base[key]:.2f}x" if key != "rss_range" else ""
        lines.append(f"| {label} | {fmt(base[key])} | {fmt(dpc[key])} | {ratio} |")
    per_voxel = base["per_voxel"], dpc["per_voxel"]
    lines.append(f"| tensor memory per voxel (linear fit) | {per_voxel[0]:.0f} B | {per_voxel[1]:.0f} B | "
                 f"{per_voxel[1] / per_voxel[0]:.2f}x |")
    lines.append(f"| largest cubic patch in {patches['budget']:g} GB (batch {patches['batch']}) | "
                 f"{patches[BASELINE]}^3 | {patches[DPCNET]}^3 | |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--stages", type=int, default=4, help="at most this many stages (nnU-Net's topology)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rss-runs", type=int, default=3, help="fresh processes per network for the peak RSS")
    parser.add_argument("--budget-gb", type=float, default=8.0, help="memory budget for the largest-patch estimate")
    add_write_readme_argument(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    patch = list(args.patch)
    plans = plans_for(patch, args.stages, args.batch)
    arch = next(iter(plans["configurations"].values()))["architecture"]["arch_kwargs"]
    header = (f"DPC-Net vs nnU-Net's network: {len(patch)}D, {arch['n_stages']} stages "
              f"{arch['features_per_stage'][0]}..{arch['features_per_stage'][-1]}, patch {'x'.join(map(str, patch))}, "
              f"batch {args.batch}, {args.device}, {torch.get_num_threads()} threads; memory: each network in a fresh "
              f"process; times: medians of {args.repeats} alternating steps in one fresh process")
    if args.device == "cpu":
        header += ("; freed memory kept for reuse in every process (keep_freed_memory, as nnunet_ext's trainers train "
                   "on the CPU) except in the glibc-defaults row")
    print(header, f"\nload before: {os.getloadavg()}", flush=True)

    results = {t: run_in_fresh_process(memory_case, t, plans, args.batch, args.device) for t in TRAINERS}
    if args.device == "cpu":
        rss = {t: [results[t]["rss"]] for t in TRAINERS}
        for _ in range(args.rss_runs - 1):
            for t in TRAINERS:
                rss[t].append(run_in_fresh_process(memory_case, t, plans, args.batch, args.device, False)["rss"])
        for t in TRAINERS:
            results[t].update(rss=statistics.median(rss[t]), rss_range=(min(rss[t]), max(rss[t])))
    # same topology at half the voxels (first axis halved) for the per-voxel memory
    half = dict(plans, configurations={k: dict(c, patch_size=[patch[0] // 2] + patch[1:])
                                       for k, c in plans["configurations"].items()})
    total_stride = 1
    for stride in arch["strides"]:
        total_stride *= max(stride)
    voxels = torch.tensor(patch).prod().item()
    for t in TRAINERS:
        small = run_in_fresh_process(memory_case, t, half, args.batch, args.device, False)["memory"]
        per_voxel = (results[t]["memory"] - small) / (voxels - voxels // 2)
        results[t].update(per_voxel=per_voxel, fixed=results[t]["memory"] - per_voxel * voxels)
    for t, values in run_in_fresh_process(interleaved_times, plans, args.batch, args.device, args.repeats).items():
        results[t].update(values)
    if args.device == "cpu":
        defaults = run_in_fresh_process(interleaved_times, plans, args.batch, args.device, args.repeats,
                                        keep_memory=False)
        for t, values in defaults.items():
            results[t]["step_wall_default"] = values["step_wall"]
    budget = args.budget_gb * 1e9
    patches = {t: largest_cubic_patch(results[t]["fixed"], results[t]["per_voxel"], budget, total_stride)
               for t in TRAINERS}
    patches.update(budget=args.budget_gb, batch=args.batch)
    markdown = cost_markdown(results, patches, header)
    load = os.getloadavg()
    print(markdown, f"\n\nload after: {load}")

    split = paper_preset_split()
    print(f"\nPaper preset (3D, widths 32..512, 1 channel, 2 classes){'measured':>14}{'paper':>10}")
    for part, measured in split.items():
        sign = "" if part == "PFE" else "+"
        paper = f"{sign}{PAPER_PARAMETERS[part] / 1e6:.2f}M"
        print(f"  {part:52}{sign + format(measured, ','):>14}{paper:>10}")
    if args.write_readme:
        write_results("dpcnet-cost", markdown)


if __name__ == "__main__":
    main()
