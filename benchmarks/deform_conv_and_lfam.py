"""Cost of the deformable convolution (per backend) and of the LFAM U-Net, as ratios measured in one run.

    python -m benchmarks.deform_conv_and_lfam [--device cpu|cuda] [--repeats 3] [--budget-gb 24]
        [--train-iters 150] [--skip-unet] [--skip-training] [--write-readme]

(a) One DCNv2 layer, forward + backward, B=1, C=16->16, k=3, random offsets (N(0, 0.5)) and mask (U(0, 1)) given as
    leaf tensors that require grad: 3D 32^3 against ``conv3d``, 2D 128^2 against ``conv2d``. Backends: the autograd
    reference (``deform_conv_reference``), the lean PyTorch Function (``generic``), the compiled CPU kernel
    (``cpp``, what ``'auto'`` picks on the CPU), torchvision (2D) and Triton (CUDA only). Times are medians of
    interleaved rounds in one process (every case once
    per round), wall and process CPU time; peak tensor memory of one call is measured in a fresh process per case;
    "saved" = bytes autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``), "x in" = saved / the
    layer's inputs (input, offsets, mask, weight).
(b) LFAM U-Net on every skip against the plan's U-Net (PlainConvUNet, 3D, 4 stages 32/64/128/256, 3x3x3, instance
    norm, LeakyReLU, deep supervision), patch 32x64x64, batch 2: training step (forward + backward, stand-in loss),
    peak tensor memory and peak RSS of one step (each network in a fresh process), inference throughput (batch 1,
    no_grad, deep supervision off). Variants: default (full predictor) and separable predictor. Step times:
    interleaved rounds of all networks in one process. The largest cubic
    3d_fullres patch (side a multiple of 8, batch 2) each network fits in ``--budget-gb``, from the measured tensor
    memory per input voxel (activations grow linearly with the voxels; the weights are negligible).
(c) Short LFAM training with each predictor on the synthetic 2D task of ``benchmarks/godc_convergence.py`` (same
    seeds, batches, initialisation of the shared parts and iterations; GODC + CE): validation Dice at the end and
    the training time.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from benchmarks.readme_results import add_write_readme_argument, write_results
from nnunet_ext.evaluation.measure import (count_parameters, fmt_bytes, make_inference_step, make_train_step,
                                           median_wall_and_cpu_time, peak_memory, run_in_fresh_process)

OP_CASES = {3: ["conv", "reference", "generic", "cpp"], 2: ["conv", "reference", "generic", "cpp", "torchvision"]}
UNET_KINDS = {"plain": "plan's U-Net", "lfam": "LFAM, all skips (default: full predictor)",
              "lfam_sep": "LFAM, all skips, separable predictor"}
PATCH = (32, 64, 64)
BATCH = 2


# ------------------------------------------------------------------------------------------------ (a) one layer
def _op_setup(dim: int, backend: str, device: str):
    """A closure running forward + backward of one layer, and the layer's input tensors."""
    from nnunet_ext.building_blocks.deform_conv import deform_conv_nd, deform_conv_reference
    torch.manual_seed(0)
    size = (32,) * 3 if dim == 3 else (128,) * 2
    K = 3 ** dim
    x = torch.randn(1, 16, *size, device=device, requires_grad=True)
    w = (torch.randn(16, 16, *(3,) * dim, device=device) * 0.1).requires_grad_()
    off = (torch.randn(1, dim * K, *size, device=device) * 0.5).requires_grad_()
    mask = torch.rand(1, K, *size, device=device).requires_grad_()
    conv = torch.nn.functional.conv3d if dim == 3 else torch.nn.functional.conv2d
    if backend == "conv":
        def fwd():
            return conv(x, w, None, 1, 1)
        inputs = (x, w)
    else:
        if backend == "torchvision":
            from torchvision.ops import deform_conv2d as fn
        elif backend == "triton":
            from nnunet_ext.building_blocks.deform_conv_triton import deform_conv_triton as fn
        elif backend == "cpp":
            from nnunet_ext.building_blocks.deform_conv_cpu import deform_conv_cpu as fn
        else:
            fn = deform_conv_reference if backend == "reference" else deform_conv_nd

        def fwd():
            return fn(x, off, w, None, 1, 1, 1, mask=mask)
        inputs = (x, w, off, mask)

    def step():
        for t in inputs:
            t.grad = None
        fwd().mean().backward()
    return step, fwd, inputs


def _saved_bytes(fwd) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fwd()
    del out
    return sum(seen.values())


def _op_memory(dim: int, backend: str, device: str) -> dict:
    step, fwd, inputs = _op_setup(dim, backend, device)
    mem = peak_memory(step, device)
    return dict(mem=mem.bytes, mem_method=mem.method, saved=_saved_bytes(fwd),
                inputs=sum(t.numel() * t.element_size() for t in inputs))


def _op_times(cases, device: str, repeats: int) -> dict:
    """Interleaved rounds: every case once per round; medians of wall and CPU time."""
    steps = {c: _op_setup(c[0], c[1], device)[0] for c in cases}
    for s in steps.values():
        s()  # warm-up
    wall = {c: [] for c in cases}
    cpu = {c: [] for c in cases}
    for _ in range(repeats):
        for c, s in steps.items():
            w, p = median_wall_and_cpu_time(s, repeats=1, warmup=0, device=device)
            wall[c].append(w)
            cpu[c].append(p)
    return {c: (float(np.median(wall[c])), float(np.median(cpu[c]))) for c in cases}


def layer_table(device: str, repeats: int) -> str:
    cases = [(d, b) for d in (3, 2) for b in OP_CASES[d] + (["triton"] if device == "cuda" else [])]
    times = _op_times(cases, device, repeats)
    mems = {c: run_in_fresh_process(_op_memory, c[0], c[1], device) for c in cases}
    lines = ["| layer | backend | wall ms | x conv | CPU ms | x conv | peak tensor memory | x conv | saved for "
             "backward | x inputs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d, b in cases:
        (w, p), m = times[(d, b)], mems[(d, b)]
        (w0, p0), m0 = times[(d, "conv")], mems[(d, "conv")]
        shape = "3D 16->16, 32^3" if d == 3 else "2D 16->16, 128^2"
        name = {"conv": f"dense conv{d}d", "generic": "generic (lean PyTorch Function)",
                "cpp": "cpp (compiled CPU kernel; auto on CPU)"}.get(b, b)
        lines.append(f"| {shape} | {name} | {w * 1e3:.1f} | {w / w0:.2f} | {p * 1e3:.1f} | {p / p0:.2f} | "
                     f"{fmt_bytes(m['mem'])} | {m['mem'] / m0['mem']:.2f} | {fmt_bytes(m['saved'])} | "
                     f"{m['saved'] / m['inputs']:.2f} |")
    return "\n".join(lines) + f"\n\nPeak tensor memory: {mems[cases[0]]['mem_method']}."


# ------------------------------------------------------------------------------------------------ (b) networks
def unet_kwargs():
    from torch import nn
    return dict(input_channels=1, n_stages=4, features_per_stage=[32, 64, 128, 256], conv_op=nn.Conv3d,
                kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=2, num_classes=3,
                n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"inplace": True}, deep_supervision=True)


def build_unet(kind: str, device: str):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_ext.architectures.lfam_unet import LFAMUNet
    torch.manual_seed(0)
    net = PlainConvUNet(**unet_kwargs())
    net.apply(PlainConvUNet.initialize)
    if kind != "plain":
        net = LFAMUNet(net, predictor="separable" if kind == "lfam_sep" else "full")
        with torch.no_grad():  # away from the identity initialisation: the costs of a trained model
            for p in net.lfam.parameters():
                p.normal_(0, 0.01)
    return net.to(device)


def _unet_memory(kind: str, device: str) -> dict:
    net = build_unet(kind, device)
    step = make_train_step(net, torch.randn(BATCH, 1, *PATCH, device=device))
    mem = peak_memory(step, device)
    net.decoder.deep_supervision = False
    infer = make_inference_step(net, torch.randn(1, 1, *PATCH, device=device))
    infer()
    wall, cpu = median_wall_and_cpu_time(infer, repeats=3, warmup=0, device=device)
    return dict(params=count_parameters(net), mem=mem.bytes, rss=mem.rss_bytes, infer_wall=wall, infer_cpu=cpu)


def _unet_times(kinds, device: str, repeats: int) -> dict:
    steps = {k: make_train_step(build_unet(k, device), torch.randn(BATCH, 1, *PATCH, device=device)) for k in kinds}
    for s in steps.values():
        s()
    res = {k: ([], []) for k in kinds}
    for _ in range(repeats):
        for k, s in steps.items():
            w, p = median_wall_and_cpu_time(s, repeats=1, warmup=0, device=device)
            res[k][0].append(w)
            res[k][1].append(p)
    return {k: (float(np.median(v[0])), float(np.median(v[1]))) for k, v in res.items()}


def largest_cubic_patch(bytes_per_voxel: float, budget_bytes: float, batch: int = BATCH, multiple: int = 8) -> int:
    """Largest side s (a multiple of ``multiple``) with ``batch * s^3 * bytes_per_voxel <= budget_bytes``."""
    side = int((budget_bytes / (batch * bytes_per_voxel)) ** (1 / 3))
    return side - side % multiple


def unet_table(device: str, repeats: int, budget_gb: float) -> str:
    kinds = list(UNET_KINDS)
    times = run_in_fresh_process(_unet_times, kinds, device, repeats)
    mems = {k: run_in_fresh_process(_unet_memory, k, device) for k in kinds}
    p_t, p_m = times["plain"], mems["plain"]
    vox = BATCH * int(np.prod(PATCH))
    lines = [f"| network | parameters | step wall s | x | step CPU s | x | peak tensor memory | x | peak RSS | x | "
             f"inference patches/CPU-s | x | largest cubic patch in {budget_gb:g} GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in kinds:
        (w, p), m = times[k], mems[k]
        side = largest_cubic_patch(m["mem"] / vox, budget_gb * 2 ** 30)
        rss = f"{fmt_bytes(m['rss'])} | {m['rss'] / p_m['rss']:.2f}" if m["rss"] else "- | -"
        lines.append(f"| {UNET_KINDS[k]} | {m['params']:,} | {w:.2f} | {w / p_t[0]:.2f} | {p:.2f} | {p / p_t[1]:.2f} "
                     f"| {fmt_bytes(m['mem'])} | {m['mem'] / p_m['mem']:.2f} | {rss} | {1 / m['infer_cpu']:.2f} | "
                     f"{p_m['infer_cpu'] / m['infer_cpu']:.2f} | {side}^3 |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ (c) predictor
def _train_lfam(predictor: str, seed: int, iters: int) -> dict:
    from benchmarks.godc_convergence import evaluate, make_batch, make_loss, make_net
    from nnunet_ext.architectures.lfam_unet import LFAMUNet
    torch.manual_seed(seed)
    net = make_net()
    torch.manual_seed(seed + 100)
    net = LFAMUNet(net, predictor=predictor)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = make_loss("godc", "dice_ce")
    val = make_batch(np.random.RandomState(7), 32, 64, 0.5)
    rng = np.random.RandomState(1000 + seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        x, y, _ = make_batch(rng, 8, 64, 0.5)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    overall, small, large = evaluate(net, *val)
    return dict(dice=overall, small=small, large=large, wall=wall, cpu=cpu,
                params=count_parameters(net.lfam))


def predictor_table(seeds, iters: int) -> str:
    seed_list = ", ".join(map(str, seeds))
    lines = [f"| predictor | LFAM parameters | Dice after {iters} iterations (mean over seeds {seed_list})"
             " | small objects | large objects | training CPU s |", "|---|---|---|---|---|---|"]
    for predictor in ("full", "separable"):
        rs = [run_in_fresh_process(_train_lfam, predictor, s, iters) for s in seeds]
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("dice", "small", "large", "cpu")}
        per_seed = ", ".join(f"{r['dice']:.3f}" for r in rs)
        lines.append(f"| {predictor} | {rs[0]['params']:,} | {mean['dice']:.3f} ({per_seed}) | {mean['small']:.3f} | "
                     f"{mean['large']:.3f} | {mean['cpu']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-gb", type=float, default=24.0)
    ap.add_argument("--train-iters", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    add_write_readme_argument(ap)
    args = ap.parse_args()
    print(f"device={args.device}  torch={torch.__version__}  threads={torch.get_num_threads()}  "
          f"load={os.getloadavg()}")
    if not args.skip_layer:
        layer = layer_table(args.device, args.repeats)
        print("\n(a) one DCNv2 layer, forward + backward\n" + layer)
        if args.write_readme:
            write_results("dcn-layer", layer)
    parts = []
    if not args.skip_unet:
        unet = unet_table(args.device, args.repeats, args.budget_gb)
        print(f"\n(b) 3D U-Net 32..256, patch {'x'.join(map(str, PATCH))}, batch {BATCH}\n" + unet)
        parts.append(f"3D, 4 stages 32..256, patch {'x'.join(map(str, PATCH))}, batch {BATCH}, against the plan's "
                     f"U-Net:\n\n" + unet)
    if not args.skip_training:
        pred = predictor_table(args.seeds, args.train_iters)
        print("\n(c) LFAM U-Net (2D, 8..64) on the synthetic task, GODC + CE, per predictor\n" + pred)
        parts.append("Offset/mask predictor, short training of the 2D LFAM U-Net (8..64 features) on the synthetic "
                     "task of `benchmarks/godc_convergence.py` (batch 8, 64x64, Adam 1e-3, GODC + CE; validation "
                     "Dice on 32 fixed images):\n\n" + pred)
    print(f"\nload={os.getloadavg()}")
    if args.write_readme and parts:
        write_results("lfam-cost", "\n\n".join(parts))


if __name__ == "__main__":
    main()
