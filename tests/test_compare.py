"""``nnunet_ext_compare`` end to end: the demo's two quick trainers (trained once per session by the fixtures) are
predicted, evaluated, costed and reported; an interrupted comparison resumes without retraining or repeating
finished steps. A 2D run trains a trainer itself through ``nnUNetv2_train`` and scores the test set."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nnunet_ext.evaluation.metrics import METRICS
from tests.conftest import DEMO_DATASET_ID

TRAINERS = ("nnUNetTrainer_quick", "nnUNetTrainerDPCNet_quick")


def compare_command(dataset, configuration, output, *trainers, extra=()):
    return [sys.executable, "-m", "nnunet_ext.evaluation.compare", str(dataset), configuration, "-tr", *trainers,
            "-f", "0", "-o", str(output), "-device", "cpu", "--disable_tta", "--cost-repeats", "1", *extra]


def run(command, env) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def check_png(path: Path, min_bytes: int = 10_000):
    assert path.stat().st_size > min_bytes
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image.std() > 10          # not a blank canvas


def test_compare_two_quick_trainers_resumes_after_interruption(demo_run, plain_checkpoint, tmp_path):
    checkpoints = {t: demo_run.model_folder(t) / "fold_0" / "checkpoint_final.pth" for t in TRAINERS}
    trained_at = {t: c.stat().st_mtime_ns for t, c in checkpoints.items()}
    output = tmp_path / "comparison"
    command = compare_command(DEMO_DATASET_ID, "3d_fullres", output, *TRAINERS)

    # interrupted (killed) once the first trainer's predictions are complete
    process = subprocess.Popen(command, env=demo_run.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    first = output / "predictions" / TRAINERS[0] / "fold_0"
    deadline = time.time() + 900
    while not first.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.is_dir() and process.poll() is None, "the comparison did not reach the first prediction"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (output / "report.md").exists()
    first_predicted_at = (first / "prediction_source.json").stat().st_mtime_ns

    stdout = run(command, demo_run.env)
    for trainer in TRAINERS:
        assert f"{trainer} fold 0: trained, reusing" in stdout
        assert checkpoints[trainer].stat().st_mtime_ns == trained_at[trainer]
    assert f"{TRAINERS[0]} fold 0: predicted, reusing" in stdout
    assert f"{TRAINERS[1]} fold 0: predicting" in stdout
    assert (first / "prediction_source.json").stat().st_mtime_ns == first_predicted_at
    assert not list((output / "logs").glob("train_*")) and not list(output.rglob("*.partial"))
    assert f"report: {output / 'report.md'}" in stdout

    report = json.loads((output / "report.json").read_text())
    cases = len(json.loads((demo_run.workdir / "nnUNet_preprocessed" / demo_run.dataset /
                            "splits_final.json").read_text())[0]["val"])
    for trainer in TRAINERS:
        summary = json.loads((output / "evaluation" / trainer / "fold_0" / "summary.json").read_text())
        for label in ("1", "2"):
            row = report["accuracy"][trainer][label]
            assert row["Dice"]["n"] + row["Dice"]["nan"] == cases
            for metric in METRICS:
                if row[metric]["mean"] is not None:
                    assert abs(row[metric]["mean"] - summary["mean"][label][metric]) < 1e-9
    cost = report["cost"]["results"]
    assert set(cost) == {"nnUNetTrainer", *TRAINERS}
    assert cost["nnUNetTrainer_quick"]["parameters"] == cost["nnUNetTrainer"]["parameters"]  # same network
    assert cost["nnUNetTrainerDPCNet_quick"]["parameters"] > cost["nnUNetTrainer"]["parameters"]

    markdown = (output / "report.md").read_text()
    accuracy_rows = [line for line in markdown.splitlines() if line.startswith(tuple(f"| {t} |" for t in TRAINERS))]
    assert len(accuracy_rows) == 2 * 2 + 2          # trainers x labels, then the two cost rows
    assert all("±" in line for line in accuracy_rows[:4])
    assert "| nnUNetTrainer | " in markdown and "(1.00x)" in markdown
    for figure in ("metrics.png", "dice_vs_step_time.png"):
        assert f"]({figure})" in markdown
        check_png(output / figure)

    # a third run recomputes nothing but the report
    logs = {p: p.stat().st_mtime_ns for p in (output / "logs").iterdir()}
    stdout = run(command, demo_run.env)
    assert "cost: measured, reusing" in stdout and "predicting" not in stdout and "evaluating" not in stdout
    assert {p: p.stat().st_mtime_ns for p in (output / "logs").iterdir()} == logs


def test_compare_trains_a_2d_trainer_and_scores_the_test_set(planned_dataset, tmp_path):
    """TN3K (2D PNG, test labels in labelsTs): the comparison trains with nnUNetv2_train and predicts imagesTs."""
    tn3k = planned_dataset("tn3k")
    output = tmp_path / "comparison"
    stdout = run(compare_command(tn3k.dataset_id, "2d", output, "nnUNetTrainer_quick",
                                 extra=("--no-cost", "--test-set")), tn3k.env)
    assert "nnUNetTrainer_quick fold 0: training" in stdout
    assert (tn3k.model_folder("nnUNetTrainer_quick") / "fold_0" / "checkpoint_final.pth").is_file()
    assert (output / "logs" / "train_nnUNetTrainer_quick_fold_0.log").is_file()
    test_labels = sorted(p.name for p in (tn3k.raw / "labelsTs").iterdir())
    predictions = output / "predictions" / "nnUNetTrainer_quick" / "fold_0"
    assert sorted(p.name for p in predictions.glob("*.png")) == test_labels and test_labels
    report = json.loads((output / "report.json").read_text())
    assert report["cost"] is None and report["figures"] == ["metrics.png"]
    assert report["settings"]["cases"] == "test (labelsTs)"
    dice = report["accuracy"]["nnUNetTrainer_quick"]["1"]["Dice"]
    assert set(report["accuracy"]["nnUNetTrainer_quick"]) == {"1"} and dice["n"] + dice["nan"] == len(test_labels)
    check_png(output / "metrics.png")
    assert "Not measured" in (output / "report.md").read_text()


def test_compare_refuses_missing_folders_and_unknown_datasets(tmp_path):
    env = {"PATH": os.environ["PATH"]}
    command = compare_command(7, "2d", tmp_path / "out", "nnUNetTrainer_quick")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "nnUNet_raw, nnUNet_preprocessed, nnUNet_results" in result.stderr
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name / "Dataset007_A").mkdir(parents=True)
        env[name] = str(tmp_path / name)
    (tmp_path / "nnUNet_preprocessed" / "Dataset007_B").mkdir()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "Dataset007_A" in result.stderr and "Dataset007_B" in result.stderr
    result = subprocess.run(compare_command("Dataset007_A", "2d", tmp_path / "out", "nnUNetTrainer_quick"), env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "nnUNetPlans.json: run nnUNetv2_plan_and_preprocess first" in result.stderr
    assert not (tmp_path / "out").exists()
