"""Cost of the Triton DCNv2 kernels (``nnunet_ext.building_blocks.deform_conv_triton``) on a CUDA GPU.

    python -m benchmarks.deform_conv_triton --triton [--repeats 20] [--dtypes float32 float16 bfloat16]
    python -m benchmarks.deform_conv_triton --compile-for 80 90 [--dtypes ...]

``--triton`` (needs a CUDA GPU): one DCNv2 layer with random offsets (N(0, 0.5^2)) and mask (U(0, 1)), all inputs
requiring grad, timed forward and forward+backward for
    3D 16->16 channels at 32^3 and 64->64 at 64^3 (k=3, padding 1, batch 1), 2D 16->16 at 128^2,
against the dense convolution of the same shape (cuDNN ``conv3d``/``conv2d``) and the PyTorch path
(``deform_conv_nd``), all in the same process, repeats interleaved (one repeat of every path, then the next), with
the peak CUDA tensor memory of one forward+backward and the largest deviation of the Triton output and gradients from
the PyTorch path. Without a GPU it says so and times nothing: the interpreter that the tests use on CPU is a
correctness tool, its speed says nothing about the kernels.

``--compile-for ARCH...`` (no GPU needed): compiles every kernel variant ahead of time for the given CUDA compute
capabilities (e.g. 80 = A100, 90 = H100) with the ptxas that ships with triton and prints registers, spill stack and
shared memory per thread block: the check that the kernels build for a GPU where none is present.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

from nnunet_ext.building_blocks import deform_conv_triton as dct
from nnunet_ext.building_blocks.deform_conv import deform_conv_nd
from nnunet_ext.evaluation.measure import peak_memory

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (dim, channels, spatial size)
LAYERS = [(3, 16, 32), (3, 64, 64), (2, 16, 128)]


def _layer(dim, channels, size, dtype, device):
    """Inputs of one k=3, padding 1 layer (all leaves requiring grad) and its incoming gradient."""
    g = torch.Generator(device=device).manual_seed(0)
    K = 3 ** dim
    shape = (1, channels) + (size,) * dim
    t = dict(input=torch.randn(shape, generator=g, device=device),
             offset=0.5 * torch.randn((1, dim * K) + shape[2:], generator=g, device=device),
             weight=torch.randn((channels, channels) + (3,) * dim, generator=g, device=device) / (channels * K) ** 0.5,
             bias=torch.randn(channels, generator=g, device=device),
             mask=torch.rand((1, K) + shape[2:], generator=g, device=device))
    t = {k: v.to(dtype).requires_grad_() for k, v in t.items()}
    return t, torch.randn(shape, generator=g, device=device).to(dtype)


def _paths(dim):
    conv = F.conv3d if dim == 3 else F.conv2d
    return {
        "dense conv (cuDNN)": lambda t: conv(t["input"], t["weight"], t["bias"], padding=1),
        "PyTorch deform_conv_nd": lambda t: deform_conv_nd(t["input"], t["offset"], t["weight"], t["bias"],
                                                           padding=1, mask=t["mask"]),
        "Triton deform_conv_triton": lambda t: dct.deform_conv_triton(t["input"], t["offset"], t["weight"], t["bias"],
                                                                      padding=1, mask=t["mask"]),
    }


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_layers(dtypes, repeats, layers=LAYERS, device="cuda"):
    """The ``--triton`` table (``layers`` and ``device`` only change for a smoke run of this code under the
    interpreter)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (triton interpreter)"
    print(f"{name}, torch {torch.__version__}, triton {dct.triton.__version__}, {repeats} interleaved repeats, "
          "median ms")
    header = "| layer | dtype | path | fwd ms | fwd+bwd ms | fwd+bwd / dense | peak MiB (fwd+bwd) | max rel dev |"
    print(header + "\n|" + "---|" * 8)
    for dim, channels, size in layers:
        for dtype_name in dtypes:
            t, grad_out = _layer(dim, channels, size, DTYPES[dtype_name], device)
            paths = _paths(dim)
            leaves = list(t.values())

            def fwd(f):
                with torch.no_grad():
                    return f(t)

            def fwd_bwd(f):
                for v in leaves:
                    v.grad = None
                f(t).backward(grad_out)
            for f in paths.values():  # warm-up (compiles the Triton kernels)
                fwd(f)
                fwd_bwd(f)
            times = {name: ([], []) for name in paths}
            for _ in range(repeats):
                for name, f in paths.items():
                    times[name][0].append(_timed(lambda: fwd(f), device))
                    times[name][1].append(_timed(lambda: fwd_bwd(f), device))
            fwd_bwd(paths["PyTorch deform_conv_nd"])
            ref = [paths["PyTorch deform_conv_nd"](t).detach().float()] + [v.grad.float() for v in leaves]
            fwd_bwd(paths["Triton deform_conv_triton"])
            got = [paths["Triton deform_conv_triton"](t).detach().float()] + [v.grad.float() for v in leaves]
            dev = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
            dense_fb = statistics.median(times["dense conv (cuDNN)"][1])
            for name, f in paths.items():
                mem = peak_memory(lambda: fwd_bwd(f), device).bytes
                fw, fb = (statistics.median(v) * 1e3 for v in times[name])
                print(f"| {dim}D {channels}->{channels} {size}^{dim} | {dtype_name} | {name} | {fw:.3f} | {fb:.3f} | "
                      f"{fb / 1e3 / dense_fb:.2f} | {mem / 2 ** 20:.1f} | "
                      f"{f'{dev:.1e}' if name.startswith('Triton') else ''} |")


def _launch_configs(dtype_name):
    """Every (kernel, pointer types, constexprs) the autograd Function can launch for one input dtype, 2D and 3D."""
    dt = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype_name]
    flags = dct.launch_flags(DTYPES[dtype_name])
    for nz in (1, 2):
        blocks = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), dct.block_sizes(64, 64)))
        common = dict(NZ=nz, HAS_MASK=True, **flags, **blocks)
        yield (dct._dcn_forward_kernel, dict(x_ptr=dt, off_ptr=dt, msk_ptr=dt, w_ptr=dt, bias_ptr=dt, out_ptr=dt),
               dict(common, HAS_BIAS=True))
        yield (dct._dcn_backward_data_kernel, dict(x_ptr=dt, off_ptr=dt, msk_ptr=dt, w_ptr=dt, gout_ptr=dt,
                                                   gx_ptr="fp32", goff_ptr="fp32", gmsk_ptr="fp32"),
               dict(common, NEED_GX=True, NEED_GOFF=True))
        yield (dct._dcn_backward_weight_kernel, dict(x_ptr=dt, off_ptr=dt, msk_ptr=dt, gout_ptr=dt, gw_ptr="fp32"),
               common)


def compile_report(archs, dtypes):
    """Ahead-of-time compilation of every kernel variant for each compute capability; registers/spills/shared."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    print(f"ahead-of-time compilation with triton {triton.__version__} (no GPU needed); "
          f"num_warps={dct.NUM_WARPS}, num_stages={dct.NUM_STAGES}")
    print("| sm | dtype | kernel | dims | registers | spill stack bytes | shared bytes |")
    print("|---" * 7 + "|")
    for arch in archs:
        for dtype_name in dtypes:
            for fn, pointers, constexprs in _launch_configs(dtype_name):
                signature = {a: "constexpr" if a in constexprs else
                             (f"*{pointers[a]}" if a in pointers else "i32") for a in fn.arg_names}
                kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                                        target=GPUTarget("cuda", int(arch), 32),
                                        options=dict(num_warps=dct.NUM_WARPS, num_stages=dct.NUM_STAGES))
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                           text=True, check=True).stdout
                regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
                print(f"| {arch} | {dtype_name} | {fn.__name__} | {'3D' if constexprs['NZ'] == 2 else '2D'} | {regs} | "
                      f"{stack} | {kernel.metadata.shared} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="store_true", help="time the Triton kernels on the CUDA GPU")
    parser.add_argument("--compile-for", nargs="+", default=[], metavar="ARCH",
                        help="compile every kernel for these compute capabilities (e.g. 80 90), no GPU needed")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not (args.triton or args.compile_for):
        parser.error("nothing to do: give --triton and/or --compile-for")
    if dct.triton is None:
        raise SystemExit("triton is not installed (it ships with the CUDA builds of torch)")
    if args.triton:
        if torch.cuda.is_available():
            time_layers(args.dtypes, args.repeats)
        else:
            print("No CUDA GPU present: the Triton kernels are not timed here (on CPU they only run in triton's "
                  "interpreter, a correctness tool whose speed says nothing about the kernels).")
    if args.compile_for:
        compile_report(args.compile_for, args.dtypes)


if __name__ == "__main__":
    main()
