"""Cost of the deformable convolution and of LFAM U-Net (vs dense conv / plain U-Net).

    python -m benchmarks.deform_conv_and_lfam [--device cpu|cuda] [--repeats 3] [--all]

(a) one deformable conv layer forward+backward against a dense conv of the same shape:
    3D: B=1, C=16->16, 32^3, k=3 (PyTorch grid_sample path, plain and chunked+checkpointed);
    2D: B=1, C=16->16, 128^2, k=3 (torchvision.ops.deform_conv2d).
    Offsets and mask are leaf tensors that require grad (as when they come from a predictor).
(b) LFAM U-Net vs the plain U-Net from the same arch kwargs: a small 3D nnU-Net-style plan
    (PlainConvUNet, 4 stages 16/32/64/128, 3x3x3, InstanceNorm, LeakyReLU, deep supervision),
    patch 32^3, batch 2 for training (stand-in loss = sum of the means of the DS outputs), batch 1
    no_grad forwards with deep supervision off for the sliding-window-style throughput (train and
    inference of a variant in separate processes). Variants: plain, LFAM on all skips, LFAM with
    min_level=1, LFAM with checkpoint=True, and with --all the decoder-guided offsets.
Every case runs in its own freshly spawned process (memory isolation); peak memory is measured on
the first call in that process, before the timing runs. FLOPs: FlopCounterMode (conv/matmul only:
grid_sample and torchvision's deform_conv2d count 0, so DCN FLOPs are the kernel contraction only).
"""
from __future__ import annotations

import argparse

import torch

from nnunet_ext.evaluation.measure import (count_parameters, flops, fmt_bytes, make_inference_step, make_train_step,
                                median_wall_and_cpu_time, peak_memory, run_in_fresh_process)



def unet_kwargs():
    from torch import nn
    return dict(input_channels=1, n_stages=4, features_per_stage=[16, 32, 64, 128], conv_op=nn.Conv3d,
                kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=2, num_classes=3,
                n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"inplace": True}, deep_supervision=True)


def _op_case(kind: str, device: str, repeats: int):
    from nnunet_ext.building_blocks.deform_conv import DeformConv
    torch.manual_seed(0)
    dim = 3 if kind.startswith("3d") else 2
    size = (32,) * 3 if dim == 3 else (128,) * 2
    x = torch.randn(1, 16, *size, device=device, requires_grad=True)
    if kind.endswith("conv"):
        conv = (torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d)(16, 16, 3, padding=1).to(device)

        def step():
            x.grad = None
            conv.zero_grad(set_to_none=True)
            conv(x).mean().backward()
        params = count_parameters(conv)
    else:
        dcn = DeformConv(16, 16, 3, dim=dim, padding=1, checkpoint=kind.endswith("ckpt")).to(device)
        K = 27 if dim == 3 else 9
        off = (torch.randn(1, dim * K, *size, device=device) * 0.5).requires_grad_()
        mask = torch.rand(1, K, *size, device=device).requires_grad_()

        def step():
            x.grad = off.grad = mask.grad = None
            dcn.zero_grad(set_to_none=True)
            dcn(x, off, mask).mean().backward()
        params = count_parameters(dcn)
    mem = peak_memory(step, device)  # first calls in this process; also the warm-up
    wall, cpu = median_wall_and_cpu_time(step, repeats=repeats, warmup=0, device=device)
    return dict(params=params, time=wall, cpu=cpu, mem=mem.bytes, mem_method=mem.method, rss=mem.rss_bytes,
                rss_method=mem.rss_method, flops=flops(step))


def _unet_case(kind: str, mode: str, device: str, repeats: int):
    """One network variant, either a training step (batch 2, DS on) or inference (batch 1, DS off, no_grad)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunet_ext.architectures.lfam_unet import LFAMUNet
    torch.manual_seed(0)
    net = PlainConvUNet(**unet_kwargs())
    net.apply(PlainConvUNet.initialize)
    if kind == "lfam_all":
        net = LFAMUNet(net)
    elif kind == "lfam_min1":
        net = LFAMUNet(net, min_level=1)
    elif kind == "lfam_all_ckpt":
        net = LFAMUNet(net, checkpoint=True)
    elif kind == "lfam_dec":
        net = LFAMUNet(net, offset_source="skip_and_decoder")
    net = net.to(device)
    if kind != "plain":
        # leave the identity initialisation so the costs are those of a trained model
        with torch.no_grad():
            for p in net.lfam.parameters():
                p.normal_(0, 0.01)
    if mode == "train":
        x = torch.randn(2, 1, 32, 32, 32, device=device)
        step = make_train_step(net, x)
        mem = peak_memory(step, device)  # first calls in this process; also the warm-up
        wall, cpu = median_wall_and_cpu_time(step, repeats=repeats, warmup=0, device=device)
        return dict(params=count_parameters(net), time=wall, cpu=cpu, mem=mem.bytes, mem_method=mem.method,
                    rss=mem.rss_bytes, rss_method=mem.rss_method, flops=flops(step),
                    fmap=int(net.compute_conv_feature_map_size((32, 32, 32))))
    net.decoder.deep_supervision = False
    infer = make_inference_step(net, torch.randn(1, 1, 32, 32, 32, device=device))
    mem = peak_memory(infer, device)
    wall, cpu = median_wall_and_cpu_time(infer, repeats=max(repeats, 5), warmup=0, device=device)
    return dict(infer_per_s=1 / wall, infer_per_cpu_s=1 / cpu, infer_mem=mem.bytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="also the decoder-guided LFAM variant")
    args = ap.parse_args()
    dev, rep = args.device, args.repeats
    print(f"device={dev}  torch={torch.__version__}  threads={torch.get_num_threads()}  repeats={rep} "
          f"(median of repeats; the peak-memory call is the warm-up; every case in a fresh process)")

    ops = ["3d_conv", "3d_dcn", "3d_dcn_ckpt", "2d_conv", "2d_dcn"]
    res = {k: run_in_fresh_process(_op_case, k, dev, rep) for k in ops}
    labels = {"3d_conv": "conv3d (dense)", "3d_dcn": "DCNv2 3D (grid_sample)",
              "3d_dcn_ckpt": "DCNv2 3D, checkpoint=True", "2d_conv": "conv2d (dense)",
              "2d_dcn": "DCNv2 2D (torchvision)"}
    r0 = res["3d_conv"]
    print("\n(a) one layer, forward+backward, B=1, C=16->16, k=3; 3D: 32^3, 2D: 128^2")
    print(f"peak mem = {r0['mem_method']}")
    if r0["rss"] is not None:
        print(f"peak RSS = {r0['rss_method']}")
    hdr = (f"{'op':28s} {'wall ms':>8s} {'x':>5s} {'cpu ms':>8s} {'x':>5s} {'peak mem':>11s} {'x':>5s} "
           f"{'peak RSS':>11s} {'GFLOP':>7s}")
    print(hdr)
    print("-" * len(hdr))
    for k in ops:
        r = res[k]
        ref = res[k[:2] + "_conv"]
        rss = fmt_bytes(r["rss"]) if r["rss"] is not None else "-"
        print(f"{labels[k]:28s} {r['time'] * 1e3:8.0f} {r['time'] / ref['time']:5.1f} {r['cpu'] * 1e3:8.0f} "
              f"{r['cpu'] / ref['cpu']:5.1f} {fmt_bytes(r['mem']):>11s} {r['mem'] / max(ref['mem'], 1):5.1f} "
              f"{rss:>11s} {r['flops'] / 1e9:7.3f}")

    kinds = ["plain", "lfam_all", "lfam_min1", "lfam_all_ckpt"] + (["lfam_dec"] if args.all else [])
    labels = {"plain": "plain U-Net", "lfam_all": "LFAM, all 3 skips", "lfam_min1": "LFAM, skips 1-2 (min_level=1)",
              "lfam_all_ckpt": "LFAM, all, checkpoint=True", "lfam_dec": "LFAM, all, offsets skip+dec"}
    ures = {}
    for k in kinds:
        ures[k] = run_in_fresh_process(_unet_case, k, "train", dev, rep)
        ures[k].update(run_in_fresh_process(_unet_case, k, "infer", dev, rep))
    p = ures["plain"]
    print("\n(b) 3D U-Net 4 stages 16/32/64/128, patch 32^3. train = fwd+bwd, batch 2, deep supervision; "
          "infer = no_grad forward, batch 1, DS off (train and infer in separate processes)")
    hdr = (f"{'network':29s} {'params':>8s} {'x':>5s} {'wall ms':>7s} {'x':>5s} {'cpu ms':>7s} {'x':>5s} "
           f"{'peak mem':>10s} {'x':>5s} {'peak RSS':>10s} {'inf/s':>6s} {'x':>5s} {'inf/cpu-s':>9s} {'x':>5s} "
           f"{'inf mem':>10s} {'GFLOP':>6s} {'fmap':>7s}")
    print(hdr)
    print("-" * len(hdr))
    for k in kinds:
        r = ures[k]
        rss = fmt_bytes(r["rss"]) if r["rss"] is not None else "-"
        print(f"{labels[k]:29s} {r['params']:8d} {r['params'] / p['params']:5.2f} {r['time'] * 1e3:7.0f} "
              f"{r['time'] / p['time']:5.2f} {r['cpu'] * 1e3:7.0f} {r['cpu'] / p['cpu']:5.2f} "
              f"{fmt_bytes(r['mem']):>10s} {r['mem'] / p['mem']:5.2f} {rss:>10s} "
              f"{r['infer_per_s']:6.2f} {r['infer_per_s'] / p['infer_per_s']:5.2f} "
              f"{r['infer_per_cpu_s']:9.2f} {r['infer_per_cpu_s'] / p['infer_per_cpu_s']:5.2f} "
              f"{fmt_bytes(r['infer_mem']):>10s} {r['flops'] / 1e9:6.2f} {r['fmap'] / 1e6:6.2f}M")
    print("\nx = ratio to the dense conv / plain U-Net. cpu ms = process CPU time (all threads), steadier than "
          "wall time on a shared machine. peak mem = tensors (profiler trace on CPU, max_memory_allocated on "
          "CUDA); peak RSS = process resident-set high-water mark (includes allocator caches). 'inf/cpu-s' = "
          "forwards per CPU-second. GFLOP = FlopCounterMode, fwd+bwd of the train step (grid_sample / "
          "deform_conv2d sampling not counted). fmap = compute_conv_feature_map_size(32^3), the nnU-Net "
          "planner's VRAM proxy.")

if __name__ == "__main__":
    main()
