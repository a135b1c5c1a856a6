"""Tests of nnunet_ext.building_blocks.deform_conv_triton (DCNv2 as Triton kernels) on CPU.

The kernels run in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before triton is
imported; pytest has imported it already, so the Triton side runs in ONE subprocess for all cases
(``python -m tests.test_deform_conv_triton IN OUT`` with ``TRITON_INTERPRET=1``): this process builds the inputs,
the subprocess returns the kernels' outputs and gradients, and the tests compare them here with the PyTorch
reference ``deform_conv_nd`` (float64) and with ``conv2d``/``conv3d`` at zero offsets.

Tolerances: float32 cases 1e-5 relative to the largest reference value (the kernels compute in fp32, the reference
in fp64). float16 / bfloat16 cases are compared with the fp32 reference evaluated on the same (rounded) inputs,
within 4e-3 (float16) and 3e-2 (bfloat16) of the largest reference value: the kernels round the modulated samples
and the grad_out tiles to the input dtype before each ``tl.dot`` and return results in it.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.building_blocks.deform_conv import deform_conv_nd, deform_conv_output_size

# name: dim, batch, in_size, kernel, stride, padding, dilation, C_in, C_out, groups, offset groups, offsets
#       ('zero' = regular grid with unit mask; 'random' = offsets round(N(0, 2^2)) + U(0.1, 0.9): many samples fall
#       outside the input, and none on an integer position, where the interpolation's derivative jumps and the
#       reference's normalised grid coordinates may round to the other side),
#       mask given, dtype
CASES = {
    "3d_zero_offsets": (3, 1, (3, 5, 3), (3, 3, 3), 1, 1, 1, 4, 6, 1, 1, "zero", True, torch.float32),
    "2d_zero_offsets_groups": (2, 1, (5, 9), (3, 3), 1, 1, 1, 4, 6, 2, 1, "zero", True, torch.float32),
    "3d_random_stride_dilation_groups_offset_groups": (3, 1, (5, 6, 7), (1, 3, 2), (2, 1, 2), (1, 1, 0), (1, 2, 1),
                                                       8, 4, 2, 4, "random", True, torch.float32),
    "2d_random_no_mask_batch2": (2, 2, (6, 7), (3, 3), (2, 1), (1, 2), (1, 2), 8, 6, 2, 2, "random", False,
                                 torch.float32),
    "2d_random_bfloat16_two_row_tiles": (2, 2, (6, 7), (3, 3), 1, 1, 1, 4, 6, 1, 1, "random", True, torch.bfloat16),
    "3d_random_float16_two_row_tiles": (3, 1, (3, 4, 4), (2, 2, 2), 1, 1, 1, 4, 6, 1, 1, "random", True,
                                        torch.float16),
}
NAMES = ("input", "offset", "weight", "bias", "mask")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(name):
    """Inputs (in the case's dtype) and the incoming gradient of one case, seeded by the case's position."""
    dim, B, in_size, ksize, stride, padding, dilation, c_in, c_out, groups, G, offsets, has_mask, dtype = CASES[name]
    g = torch.Generator().manual_seed(list(CASES).index(name))
    n = dim

    def tup(v):
        return (v,) * n if isinstance(v, int) else tuple(v)
    out_size = deform_conv_output_size(in_size, ksize, tup(stride), tup(padding), tup(dilation))
    K = torch.Size(ksize).numel()
    t = dict(input=torch.randn(B, c_in, *in_size, generator=g),
             weight=torch.randn(c_out, c_in // groups, *ksize, generator=g) / (c_in // groups * K) ** 0.5,
             bias=torch.randn(c_out, generator=g))
    if offsets == "zero":
        t["offset"] = torch.zeros(B, n * G * K, *out_size)
        t["mask"] = torch.ones(B, G * K, *out_size)
    else:
        shape = (B, n * G * K, *out_size)
        t["offset"] = torch.round(2 * torch.randn(shape, generator=g)) + 0.1 + 0.8 * torch.rand(shape, generator=g)
        t["mask"] = torch.rand(B, G * K, *out_size, generator=g) if has_mask else None
    t = {k: None if v is None else v.to(dtype) for k, v in t.items()}
    t["grad_out"] = torch.randn(B, c_out, *out_size, generator=g).to(dtype)
    t["geometry"] = dict(stride=stride, padding=padding, dilation=dilation)
    return t


def _forward_backward(fn, t, dtype=None):
    """``fn``'s output and the gradients of every given input for the incoming gradient ``t['grad_out']``;
    inputs cast to ``dtype`` first (default: kept)."""
    leaves = {k: None if t[k] is None else t[k].to(dtype or t[k].dtype).detach().requires_grad_() for k in NAMES}
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], mask=leaves["mask"],
             **t["geometry"])
    out.backward(t["grad_out"].to(out.dtype))
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def _interpreter_main(in_path, out_path):
    """Subprocess side (``TRITON_INTERPRET=1``): forward + backward of every case with the Triton kernels, plus
    what the autograd Function saves for backward (via ``saved_tensors_hooks``) and the wall time per case."""
    from nnunet_ext.building_blocks.deform_conv_triton import deform_conv_triton, triton_deform_conv_available
    inputs = torch.load(in_path)
    results = {"available_on_cpu": triton_deform_conv_available("cpu")}
    for name, t in inputs.items():
        saved = []

        def pack(x):
            saved.append(x)
            return x
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out, grads = _forward_backward(deform_conv_triton, t)
        results[name] = dict(out=out, grads=grads, seconds=time.perf_counter() - start,
                             saved_shapes=[tuple(s.shape) for s in saved])
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    """Runs every case with the Triton kernels in one interpreter subprocess; returns its results."""
    folder = tmp_path_factory.mktemp("deform_conv_triton")
    torch.save({name: make_inputs(name) for name in CASES}, folder / "inputs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tests.test_deform_conv_triton", str(folder / "inputs.pt"),
                           str(folder / "results.pt")], env=env, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(folder / "results.pt")
    print(json.dumps({"subprocess_s": round(time.perf_counter() - start, 1),
                      **{n: round(results[n]["seconds"], 1) for n in CASES}}))
    return results


def _assert_close(actual, expected, dtype, what):
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max abs error {err:.3g} > {TOLERANCE[dtype]} * {scale:.3g}"


def test_interpreter_runs_the_kernels_on_cpu(triton_results):
    assert triton_results["available_on_cpu"] is True


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][11] == "zero"])
def test_zero_offsets_unit_mask_equal_dense_conv(triton_results, name):
    """Regular grid and mask 1: output and the input/weight/bias gradients are those of conv2d/conv3d."""
    t = make_inputs(name)
    dim, groups, dtype = CASES[name][0], CASES[name][9], CASES[name][13]
    conv = F.conv3d if dim == 3 else F.conv2d
    got = triton_results[name]

    def dense(x, offset, weight, bias, mask, stride, padding, dilation):
        return conv(x, weight, bias, stride, padding, dilation, groups) + 0 * (offset.sum() + mask.sum())
    ref_out, ref_grads = _forward_backward(dense, t, torch.float64)
    assert got["out"].shape == ref_out.shape and got["out"].dtype == dtype
    _assert_close(got["out"], ref_out, dtype, "output")
    for k in ("input", "weight", "bias"):
        assert got["grads"][k].shape == t[k].shape and got["grads"][k].dtype == dtype
        _assert_close(got["grads"][k], ref_grads[k], dtype, f"grad {k}")


@pytest.mark.parametrize("name", list(CASES))
def test_matches_pytorch_reference_values_and_all_gradients(triton_results, name):
    """Output and the gradients of input, offset, weight, bias and mask agree with ``deform_conv_nd``
    (float64 for float32 cases; fp32 on the rounded inputs for float16/bfloat16 cases)."""
    t = make_inputs(name)
    dtype = CASES[name][13]
    got = triton_results[name]
    ref_out, ref_grads = _forward_backward(deform_conv_nd, t, torch.float64 if dtype == torch.float32 else
                                           torch.float32)
    assert got["out"].shape == ref_out.shape and got["out"].dtype == dtype
    _assert_close(got["out"], ref_out, dtype, "output")
    assert set(got["grads"]) == set(ref_grads) == {k for k in NAMES if t[k] is not None}
    for k, ref in ref_grads.items():
        assert got["grads"][k].shape == ref.shape and got["grads"][k].dtype == t[k].dtype, k
        assert ref.abs().max() > 0, f"degenerate case: reference grad {k} is zero"
        _assert_close(got["grads"][k], ref, dtype, f"grad {k}")


@pytest.mark.parametrize("name", list(CASES))
def test_saves_only_its_inputs_for_backward(triton_results, name):
    t = make_inputs(name)
    expected = [tuple(t[k].shape) for k in ("input", "offset", "weight", "mask") if t[k] is not None]
    assert triton_results[name]["saved_shapes"] == expected


def test_cpu_tensors_without_interpreter_raise_a_clear_error():
    from nnunet_ext.building_blocks.deform_conv_triton import deform_conv_triton, triton_deform_conv_available
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "this test checks the non-interpreted path"
    assert not triton_deform_conv_available("cpu")
    t = make_inputs("2d_zero_offsets_groups")
    with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        deform_conv_triton(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])


@pytest.mark.parametrize("change,error,message", [
    (dict(offset=torch.zeros(1, 17, 5, 9)), ValueError, r"offset must have shape"),
    (dict(mask=torch.ones(1, 8, 5, 9)), ValueError, r"mask must have shape"),
    (dict(weight=torch.zeros(6, 3, 3, 3)), ValueError, r"not divisible by weight.shape\[1\] = 3"),
    (dict(bias=torch.zeros(5)), ValueError, r"bias must have shape \(6,\)"),
    (dict(input=torch.zeros(1, 4, 5, 9, dtype=torch.float64)), TypeError, r"float32, float16 and bfloat16"),
    (dict(input=torch.zeros(1, 4, 5, 9, 2, 2)), ValueError, r"2 or 3 spatial dims"),
])
def test_bad_input_is_rejected_with_a_named_error(change, error, message):
    from nnunet_ext.building_blocks.deform_conv_triton import deform_conv_triton
    t = {**make_inputs("2d_zero_offsets_groups"), **change}
    with pytest.raises(error, match=message):
        deform_conv_triton(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])


if __name__ == "__main__":
    _interpreter_main(*sys.argv[1:3])
