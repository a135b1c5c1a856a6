"""Shared pytest fixtures."""
from pathlib import Path

import pytest

from nnunet_ext.synthetic.lits import make_synthetic_lits


@pytest.fixture(scope="session")
def synthetic_lits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic LiTS release (default size, seed 0) in the real LiTS layout; treat it as read-only.

    Training cases 0-3 in ``Training Batch 1``, 8-11 in ``Training Batch 2``; test volumes 0 and 1
    in ``LITS-Challenge-Test-Data``. Case 11's segmentation carries an identity geometry while its
    volume does not; case 8 has identity geometry in both files. Copy it before modifying it.
    """
    root = tmp_path_factory.mktemp("synthetic_lits")
    make_synthetic_lits(root)
    return root
