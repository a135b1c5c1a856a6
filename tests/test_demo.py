"""``nnunet_ext_demo``: the trainer name is checked in the first second without torch, ``--help`` lists every trainer,
``--quick`` picks the ``_quick`` variant, the demo runs from a venv that is not activated, and a trainer of ours shows
its progress on the console (a live bar on a terminal, lines otherwise) but never in nnU-Net's log file."""
import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nnunet_ext.training.trainer_names as trainer_names
from nnunet_ext.demo import DEFAULT_TRAINER, choose_trainer, quick_variant
from nnunet_ext.training.progress import EpochProgress, format_seconds
from nnunet_ext.training.registry import TRAINERS

DEMO = Path(sys.executable).parent / "nnunet_ext_demo"


def test_name_index_equals_the_registry():
    assert trainer_names.TRAINER_NAMES == tuple(TRAINERS), \
        "the torch-free trainer index is stale: run python -m nnunet_ext.training.trainer_names and commit it"


def test_write_index_rewrites_a_stale_copy(tmp_path):
    copy = tmp_path / "trainer_names.py"
    source = Path(trainer_names.__file__).read_text()
    stale = source.replace('    "nnUNetTrainerDPCNet",\n', "").replace("TRAINER_NAMES = (\n",
                                                                         'TRAINER_NAMES = (\n    "nnUNetTrainerOld",\n')
    copy.write_text(stale)
    assert trainer_names.write_index(copy) is True
    assert copy.read_text() == source
    assert trainer_names.write_index(copy) is False


def test_demo_module_and_name_check_do_not_import_torch():
    code = "import sys, nnunet_ext.demo as d; d.choose_trainer('nnUNetTrainerDPCNet_quick', False); " \
           "print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_misspelt_trainer_fails_within_2_s_suggesting_the_name_and_leaves_nothing(tmp_path):
    start = time.perf_counter()
    result = subprocess.run([str(DEMO), "--trainer", "nnUNetTrainerDPCNett"], cwd=tmp_path, capture_output=True,
                            text=True)
    seconds = time.perf_counter() - start
    assert result.returncode != 0
    assert "unknown trainer 'nnUNetTrainerDPCNett'; did you mean nnUNetTrainerDPCNet," in result.stderr
    assert seconds < 2.0, f"the name check took {seconds:.2f} s"
    assert list(tmp_path.iterdir()) == []  # no ./nnunet_ext_demo, nothing else


def test_help_lists_every_registered_trainer():
    result = subprocess.run([str(DEMO), "--help"], capture_output=True, text=True, check=True)
    listed = result.stdout.split("registered trainers (--trainer):", 1)[1]
    assert set(re.findall(r"nnUNetTrainer\w*", listed)) == set(TRAINERS)
    assert DEFAULT_TRAINER in TRAINERS and f"default: {DEFAULT_TRAINER}" in " ".join(result.stdout.split())


def test_quick_picks_the_quick_variant_and_refuses_a_trainer_without_one():
    assert quick_variant("nnUNetTrainerDPCNet_demo") == "nnUNetTrainerDPCNet_quick"
    assert quick_variant("nnUNetTrainerLFAMGODC") == "nnUNetTrainerLFAMGODC_quick"
    assert choose_trainer(DEFAULT_TRAINER, quick=True) == "nnUNetTrainerDPCNet_quick"
    assert choose_trainer("nnUNetTrainerGODC", quick=True) == "nnUNetTrainerGODC_quick"
    assert choose_trainer("nnUNetTrainerGODC", quick=False) == "nnUNetTrainerGODC"
    with pytest.raises(ValueError, match="nnUNetTrainerDPCNetPaper has no registered _quick variant"):
        choose_trainer("nnUNetTrainerDPCNetPaper", quick=True)
    with pytest.raises(ValueError, match="unknown trainer 'nnUNetTrainerGODX'; did you mean nnUNetTrainerGODC"):
        choose_trainer("nnUNetTrainerGODX", quick=False)


def test_every_demo_variant_has_a_quick_variant():
    demo_variants = [name for name in TRAINERS if name.endswith("_demo")]
    assert DEFAULT_TRAINER in demo_variants
    assert all(quick_variant(name) in TRAINERS for name in demo_variants)


# --- progress ------------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_on_a_pipe_first_every_interval_and_last():
    stream, clock = io.StringIO(), Clock()
    progress = EpochProgress(2, 20, 6, stream=stream, interval_s=10.0, clock=clock)
    for seconds, loss in zip((4, 4, 4, 4, 4, 4), (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)):
        clock.now += seconds
        progress.update(loss)
    progress.close()
    # after iteration 1 (4 s, 5 x 4 s left), 4 (16 s >= 10 s since the last line, 2 left x 4 s) and 6 (the last)
    assert stream.getvalue().splitlines() == [
        "epoch 3/20: 1/6 iterations, loss 0.9000, 4 s elapsed, 20 s left",
        "epoch 3/20: 4/6 iterations, loss 0.6000, 16 s elapsed, 8 s left",
        "epoch 3/20: 6/6 iterations, loss 0.4000, 24 s elapsed, 0 s left",
    ]


def test_progress_on_a_terminal_is_a_live_bar():
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as terminal:
        progress = EpochProgress(0, 2, 5, stream=terminal)
        for loss in (1.5, 1.25, 1.0):
            time.sleep(0.2)  # an iteration; tqdm redraws at most every 0.1 s
            progress.update(loss)
        terminal.flush()
        shown = b""
        while select.select([primary], [], [], 5)[0]:  # never blocks: what the bar wrote, until 5 s of silence
            shown += os.read(primary, 65536)
            if b"loss=1.0000" in shown:
                break
        shown = shown.decode()
        progress.close()
    os.close(primary)
    assert "\r" in shown and "epoch 1/2" in shown and "3/5" in shown and "loss=1.0000" in shown
    assert "iterations" not in shown  # not the plain-line form


def test_progress_refuses_an_empty_epoch_and_formats_durations():
    with pytest.raises(ValueError, match="at least one iteration"):
        EpochProgress(0, 1, 0, stream=io.StringIO())
    assert [format_seconds(s) for s in (47.4, 185, 3725)] == ["47 s", "3 min 05 s", "1 h 02 min"]


# --- the demo run (the session's quick demo, see conftest.demo_run) ------------------------------------------------

def test_demo_ran_from_a_venv_that_is_not_activated(demo_run):
    scripts = Path(sys.executable).parent.resolve()
    assert all(Path(p).resolve() != scripts for p in demo_run.path.split(os.pathsep) if p)
    assert "Dice per label (1 liver, 2 tumour)" in demo_run.stdout


def test_demo_echoes_training_progress_and_reports_step_times(demo_run):
    for epoch in (1, 2):
        assert f"epoch {epoch}/2: 1/5 iterations" in demo_run.stdout
        assert f"epoch {epoch}/2: 5/5 iterations, loss" in demo_run.stdout
    assert "Pseudo dice" in demo_run.stdout
    steps = re.search(r"Time per step \(wall, CPU\): (.*)", demo_run.stdout).group(1)
    assert [step.split()[0] for step in steps.split(", ")] == [
        "synthetic", "convert", "plan_and_preprocess", "train", "predict_validation", "predict_test", "evaluate"]
    assert "data seed 0" in demo_run.stdout


def test_progress_stays_out_of_nnunets_log_file(demo_run):
    fold = demo_run.model_folder("nnUNetTrainerDPCNet_quick") / "fold_0"
    (log,) = fold.glob("training_log_*.txt")
    text = log.read_text()
    assert "Epoch time" in text and "iterations, loss" not in text
    train_log = next((demo_run.workdir / "logs").glob("*_train.log")).read_text()
    assert "epoch 2/2: 5/5 iterations, loss" in train_log
