"""The compiled CPU kernels' loader: each kernel's environment switch turns it off (checked in a fresh process,
where nothing is loaded yet), and a changed shared header changes the build name."""
import os
import subprocess
import sys

import pytest

from nnunet_ext.building_blocks import cpu_extension

SWITCHES = [
    ("nnunet_ext.building_blocks.deform_conv_cpu", "cpu_kernel_available", "NNUNET_EXT_DCN_CPU_KERNEL"),
    ("nnunet_ext.building_blocks.depthwise", "depthwise_kernel_available", "NNUNET_EXT_DEPTHWISE_CPU_KERNEL"),
    ("nnunet_ext.building_blocks.gelu_norm", "gelu_norm_kernel_available", "NNUNET_EXT_GELU_NORM_CPU_KERNEL"),
    ("nnunet_ext.building_blocks.convmixer_depthwise", "convmixer_kernel_available",
     "NNUNET_EXT_CONVMIXER_CPU_KERNEL"),
    ("nnunet_ext.building_blocks.pyramid_correlation", "attention_resample_kernel_available",
     "NNUNET_EXT_ATTENTION_RESAMPLE_CPU_KERNEL"),
    ("nnunet_ext.building_blocks.pyramid_correlation", "squeeze_kernel_available", "NNUNET_EXT_SQUEEZE_CPU_KERNEL"),
]


@pytest.mark.parametrize("module, function, variable", SWITCHES)
def test_environment_switch_turns_the_kernel_off(module, function, variable):
    script = f"from {module} import {function}; print({function}())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, variable: "0"})
    assert result.stdout.strip() == "False"
    assert "building" not in result.stderr  # nothing was compiled


def test_a_changed_header_changes_the_build_name(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_extension, "CSRC", tmp_path)
    (tmp_path / "plane.h").write_text("// one\n")
    first = cpu_extension._headers_digest()
    assert cpu_extension._headers_digest() == first
    (tmp_path / "plane.h").write_text("// two\n")
    assert cpu_extension._headers_digest() != first
