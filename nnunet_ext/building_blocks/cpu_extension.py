"""Build-on-first-use of the package's compiled CPU kernels (``csrc/*.cpp``, registered as ``torch.ops`` namespaces).

``load_cpu_extension`` compiles a kernel with ``torch.utils.cpp_extension.load`` the first time a machine needs it
(cached in torch's extension directory, ``TORCH_EXTENSIONS_DIR``, once per CPU instruction set, so a cache shared by
machines with different CPUs never runs instructions a machine lacks), prints a notice when the build takes more than
3 s, and returns False with a warning where it cannot be built (no C++ compiler): the callers then run their
pure-PyTorch path. An environment variable per kernel (``=0``) turns it off.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
# vector instructions by the CPU capability torch itself dispatches on
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                         "-mprefer-vector-width=512"],
              "AVX2": ["-mavx2", "-mfma"]}


def _headers_digest() -> str:
    """A digest of the shared headers ``csrc/*.h``: part of every kernel's build name, so that a changed header
    rebuilds the kernels including it (``torch.utils.cpp_extension.load`` only tracks the sources' contents)."""
    digest = hashlib.sha1()
    for header in sorted(CSRC.glob("*.h")):
        digest.update(header.name.encode() + header.read_bytes())
    return digest.hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def load_cpu_extension(source: str, namespace: str, description: str, disable_variable: str) -> bool:
    """Build (first call on a machine) or load ``csrc/<source>``, whose ops are ``torch.ops.<namespace>``; False (with
    a warning) when it cannot be built or when the environment variable ``disable_variable`` is ``0``.
    ``description`` names the kernel in messages (e.g. ``"deformable-convolution CPU kernel"``)."""
    if os.environ.get(disable_variable, "1") == "0":
        return False
    if hasattr(torch.ops, namespace) and hasattr(getattr(torch.ops, namespace), "forward"):
        return True
    from torch.utils import cpp_extension
    path_to_source = CSRC / source
    isa = torch.backends.cpu.get_cpu_capability()
    start = time.monotonic()
    notice = threading.Timer(3, print, [f"nnunet_ext: building the {description} (once per machine, about 25 s) ..."],
                             {"file": sys.stderr, "flush": True})
    notice.start()
    path = os.environ.get("PATH", "")
    # the ninja that pip installed next to this interpreter, also when its environment is not activated
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        cpp_extension.load(name=f"{namespace}_{isa.lower()}_{_headers_digest()}", sources=[str(path_to_source)],
                           extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", *_ISA_FLAGS.get(isa, [])],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no headers: the pure-PyTorch path still works
        warnings.warn(f"nnunet_ext: could not build the {description} {path_to_source} ({e}); using the slower "
                      f"pure-PyTorch path", RuntimeWarning, stacklevel=3)
        return False
    finally:
        notice.cancel()
        os.environ["PATH"] = path
    if time.monotonic() - start > 5:
        print(f"nnunet_ext: built the {description} in {time.monotonic() - start:.0f} s (once per machine)",
              file=sys.stderr)
    return True
