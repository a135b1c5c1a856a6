"""``nnunet_ext_make_synthetic DATASET OUT [--seed S] [--overwrite]``: a dataset's synthetic twin.

One line per dataset in :data:`GENERATORS`: the name used on the command line and a generator
``make(root, seed=..., overwrite=...)`` that writes the release in the dataset's real layout under
``root`` (refusing a non-empty ``root`` unless ``overwrite``, which replaces only the generator's own
folders there) and returns a dict that describes what it wrote (its ``root`` included). The
dataset's converter then reads that release: ``nnunet_ext_convert_<dataset> OUT/<top folder> -d ID``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from nnunet_ext.synthetic import ultrasound_breast_thyroid as breast_thyroid
from nnunet_ext.synthetic.acdc import make_synthetic_acdc
from nnunet_ext.synthetic.kidneyus import make_synthetic_kidneyus
from nnunet_ext.synthetic.lits import make_synthetic_lits
from nnunet_ext.synthetic.liverus import make_synthetic_liverus
from nnunet_ext.synthetic.synapse import make_synthetic_synapse
from nnunet_ext.synthetic.ussim import make_synthetic_ussim

GENERATORS: dict[str, Callable[..., dict]] = {
    "lits": make_synthetic_lits,
    "synapse": make_synthetic_synapse,
    "acdc": make_synthetic_acdc,
    "kidneyus": make_synthetic_kidneyus,
    "ussim": make_synthetic_ussim,
    "liverus": make_synthetic_liverus,
    "busi": breast_thyroid.make_synthetic_busi,
    "busis": breast_thyroid.make_synthetic_busis,
    "tn3k": breast_thyroid.make_synthetic_tn3k,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of ``nnunet_ext_make_synthetic``."""
    parser = argparse.ArgumentParser(prog="nnunet_ext_make_synthetic",
                                     description="Write a tiny synthetic dataset in the real folder layout of a "
                                                 "public dataset, for the converters, the tests and the demo.")
    parser.add_argument("dataset", choices=sorted(GENERATORS), help="which dataset's twin to write")
    parser.add_argument("out", type=Path, help="output folder (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the generated folders in a non-empty OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point; exits 1 with ``error: ...`` when the output folder is not usable."""
    args = parse_args(argv)
    try:
        info = GENERATORS[args.dataset](args.out, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"Wrote synthetic {args.dataset} to {info['root']}")


if __name__ == "__main__":
    main()
