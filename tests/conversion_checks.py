"""Checks every converter test makes: a refused conversion and an untouched output."""
from pathlib import Path
from typing import Callable, Dict, Sequence

import pytest


def refused(main: Callable, argv: Sequence, capsys) -> str:
    """``main(argv)`` exits with status 1 and an ``error:`` line, without a traceback; returns what it printed."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "error: " in error and "Traceback" not in error, error
    return error


def files_of(folder: Path) -> Dict[Path, bytes]:
    """Every file under ``folder`` with its bytes, to show that a refused conversion changed nothing."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
