"""``nnunet_ext_make_synthetic``: every registered generator through the command line, and seed determinism."""
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_ext.synthetic.cli import GENERATORS, main


def snapshot(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_writes_refuses_a_used_folder_and_overwrites(name: str, tmp_path: Path, capsys):
    out = tmp_path / name
    main([name, str(out), "--seed", "3"])
    assert f"Wrote synthetic {name} to {out}" in capsys.readouterr().out
    written = snapshot(out)
    assert len(written) >= 4
    (out / "user_notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main([name, str(out), "--seed", "4"])
    assert exit_info.value.code == 1 and f"error: {out} is not empty" in capsys.readouterr().err
    assert snapshot(out) == {**written, "user_notes.txt": b"mine"}
    main([name, str(out), "--seed", "3", "--overwrite"])
    assert (out / "user_notes.txt").read_text() == "mine"  # only the generator's own folders are replaced
    assert set(snapshot(out)) == set(written) | {"user_notes.txt"}


@pytest.mark.parametrize("name", ["busi", "busis", "tn3k"])
def test_same_seed_same_files(name: str, tmp_path: Path):
    GENERATORS[name](tmp_path / "a", seed=5)
    GENERATORS[name](tmp_path / "b", seed=5)
    GENERATORS[name](tmp_path / "c", seed=6)
    first = snapshot(tmp_path / "a")
    assert snapshot(tmp_path / "b") == first
    other = snapshot(tmp_path / "c")
    assert set(other) == set(first) and other != first


def test_console_command_lists_every_dataset():
    result = subprocess.run([str(Path(sys.executable).parent / "nnunet_ext_make_synthetic"), "--help"],
                            capture_output=True, text=True, check=True)
    assert all(name in result.stdout for name in GENERATORS)
