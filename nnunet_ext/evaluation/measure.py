"""Measuring helpers (parameters, step time, peak memory, throughput, FLOPs) for ``nnunet_ext_compare``'s cost table
and the benchmarks (in the package, so that the installed `nnunet_ext_compare` can measure).

API (all functions take plain callables, so they work for any network or op):

    count_parameters(model, trainable_only=False) -> int
    total_loss(output) -> Tensor
        scalar stand-in loss: sum of the means of a tensor or of every tensor in a list/tuple
        (deep-supervision outputs).
    make_train_step(model, x, loss_fn=total_loss, optimizer=None) -> fn()
        one forward + backward (+ optimizer.step() if given); gradients are zeroed (set to None)
        first, so repeated calls measure a steady-state training step.
    make_inference_step(model, x) -> fn()
        one forward under torch.no_grad() in eval mode (turn deep supervision off yourself:
        ``model.decoder.deep_supervision = False`` for nnU-Net networks).
    median_time(fn, repeats=5, warmup=1, device=None) -> float
        median wall time of fn() in seconds (CUDA: synchronised before and after each call).
    median_wall_and_cpu_time(fn, repeats=5, warmup=1, device=None) -> (wall_s, cpu_s)
        medians of wall time and of this process's CPU time (all threads, ``time.process_time``) over
        the same calls. On a shared/loaded CPU the CPU time is the steadier measure of work done
        (wall time includes waiting for other processes); it is ~ threads x wall when unloaded.
    throughput(fn, items_per_call=1, repeats=5, warmup=1, device=None) -> float
        items per second = items_per_call / median_time (e.g. sliding-window patches per second).
    flops(fn) -> int
        floating point operations of one fn() call counted by ``torch.utils.flop_counter.FlopCounterMode``
        (forward AND backward when fn is a train step). Counts only ops with a registered formula
        (convolutions, matmul/bmm/einsum, attention); e.g. ``grid_sample``, ``torchvision::deform_conv2d``,
        norms and activations count 0.
    peak_memory(fn, device=None) -> PeakMemory(bytes, method, rss_bytes, rss_method)
        extra memory at the peak of one fn() call, above what was allocated before it.
        ``bytes`` = tensor memory, comparable between CPU and CUDA:
          CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call;
          CPU: peak of the running sum of the allocation/free events that ``torch.profiler``
          (``profile_memory=True``) records during the call (tensors allocated before the call and
          freed during it are not subtracted, so this can only over-estimate slightly).
        fn() is called twice on CPU (first for the RSS, then under the profiler).
        ``rss_bytes`` (CPU only, else None) = process resident-set high-water mark: the peak RSS
          (``VmHWM``) is reset to the current RSS by writing 5 to ``/proc/self/clear_refs``, fn() runs,
          then ``VmHWM - VmRSS_before``; falls back to ``getrusage(RUSAGE_SELF).ru_maxrss`` (then only
          valid in a fresh process). This includes what the tensor count misses (oneDNN/MKL scratch,
          malloc fragmentation and cached free memory), so it is >= the tensor peak and depends on the
          allocator's history: measure in a fresh process (``run_in_fresh_process``).
    run_in_fresh_process(target, *args, keep_memory=True, **kwargs) -> result
        runs ``target(*args, **kwargs)`` in a newly spawned Python process and returns its (picklable)
        result; use it to isolate memory measurements from each other. ``target`` must be importable
        (a top-level function of a module or of a script guarded by ``if __name__ == "__main__"``).
        ``keep_memory``: the process first makes glibc keep freed memory for reuse
        (``nnunet_ext.training.cpu_memory.keep_freed_memory``), as ``nnunet_ext``'s trainers do when they
        train on the CPU; ``False`` measures with glibc's defaults.
    fmt_bytes(n) -> str

Typical use (one case per fresh process):

    def case(kind):                     # top-level in the benchmark script
        model, x = build(kind)
        step = make_train_step(model, x)
        mem = peak_memory(step)         # first: measures the first step from a clean state
        wall, cpu = median_wall_and_cpu_time(step, warmup=0)
        return mem, wall, cpu
    mem, wall, cpu = run_in_fresh_process(case, "lfam")
"""
from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["PeakMemory", "count_parameters", "total_loss", "make_train_step", "make_inference_step",
           "median_time", "median_wall_and_cpu_time", "throughput", "flops", "peak_memory", "run_in_fresh_process",
           "fmt_bytes"]


@dataclass
class PeakMemory:
    bytes: int
    method: str
    rss_bytes: Optional[int] = None
    rss_method: Optional[str] = None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def total_loss(output: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.float().mean()
    return sum(o.float().mean() for o in output)


def make_train_step(model: nn.Module, x: torch.Tensor, loss_fn: Callable = total_loss,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[], None]:
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    return step


def make_inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model.eval()

    def step():
        with torch.no_grad():
            return model(x)
    return step


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_wall_and_cpu_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                             device=None) -> Tuple[float, float]:
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def throughput(fn: Callable[[], Any], items_per_call: int = 1, repeats: int = 5, warmup: int = 1,
               device=None) -> float:
    return items_per_call / median_time(fn, repeats, warmup, device)


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """``aten.convolution_backward``: each of the input and weight gradients costs the forward convolution's
    multiply-adds. (torch's own formula ignores ``groups`` for the input gradient: it counted a 3x3 depthwise
    convolution's backward over 96 channels at 256^2 as 11.0 GFLOPs instead of 0.23.)"""
    from torch.utils.flop_counter import conv_flop_count
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations (2 per multiply-add) of the convolutions and matrix products ``fn`` runs, by
    ``torch.utils.flop_counter`` with the grouped-convolution backward counted correctly, and the compiled depthwise
    convolution's ops counted like the convolutions they are."""
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_ext.building_blocks.convmixer_depthwise import convmixer_flop_formulas
    from nnunet_ext.building_blocks.depthwise import depthwise_flop_formulas
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop,
                                                             **depthwise_flop_formulas(),
                                                             **convmixer_flop_formulas()})
    with counter:
        fn()
    return int(counter.get_total_flops())


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C++-level stderr (the profiler's start/stop and 'unknown size' notices)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiler_tensor_peak(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


def peak_memory(fn: Callable[[], Any], device=None) -> PeakMemory:
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device) - base,
                          "tensors: torch.cuda.max_memory_allocated - allocated before")
    # first call: process RSS (before the profiler, whose own start-up would inflate the RSS),
    # second call: tensor peak from the profiler's allocation trace
    tensor_method = "tensors: torch.profiler allocation trace (peak of live bytes allocated during the call)"
    rss_before = _proc_status_kb("VmRSS")
    if _reset_hwm():
        fn()
        rss = max(0, _proc_status_kb("VmHWM") - rss_before) * 1024
        rss_method = "process RSS: VmHWM (reset via /proc/self/clear_refs) - RSS before, first call"
    else:
        fn()
        rss = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024  # KiB on Linux
        rss_method = "process RSS: ru_maxrss - RSS before, first call (valid in a fresh process only)"
    gc.collect()
    return PeakMemory(_profiler_tensor_peak(fn), tensor_method, rss, rss_method)


def run_in_fresh_process(target: Callable, *args, keep_memory: bool = True, **kwargs):
    from nnunet_ext.training.cpu_memory import keep_freed_memory
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, initializer=keep_freed_memory if keep_memory else None) as pool:
        return pool.apply(target, args, kwargs)


def fmt_bytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"
