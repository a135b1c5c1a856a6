"""DLKUNet through the real nnU-Net commands on the converted synthetic Synapse dataset (2d, CPU): train the quick
DLKUNet-S, predict in a new process, evaluate; and a short real training run of the dynamic-loss variant whose
training log shows the schedule's Dice/CE weights changing from epoch to epoch."""
import json
import re
import shutil

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_ext.losses.schedules import DynamicLossSchedule
from nnunet_ext.training.base import QUICK_SCHEDULE
from tests.conftest import TRAINING_THREADS, nnunet_command

DATASET = "synapse"


def train(dataset, trainer: str):
    dataset.run(nnunet_command("nnUNetv2_train"), dataset.dataset_id, "2d", "0", "-tr", trainer, "-device", "cpu")
    return dataset.model_folder(trainer) / "fold_0"


def test_train_predict_evaluate(planned_dataset, tmp_path):
    dataset = planned_dataset(DATASET)
    trainer = "nnUNetTrainerDLKUNetS_quick"
    fold = train(dataset, trainer)
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer and checkpoint["current_epoch"] == QUICK_SCHEDULE.epochs
    weights = checkpoint["network_weights"]
    assert any(k.startswith("encoder.0.lka.") for k in weights) and "heads.1.weight" in weights

    validated = sorted(p.name for p in (fold / "validation").glob("*.nii.gz"))
    assert validated, "the final validation wrote no segmentation"
    images = tmp_path / "images"
    images.mkdir()
    file_ending = ".nii.gz"
    for case in validated:
        case_id = case[:-len(file_ending)]
        for image in (dataset.raw / "imagesTr").glob(f"{case_id}_[0-9][0-9][0-9][0-9]{file_ending}"):
            shutil.copy(image, images / image.name)
    predictions = tmp_path / "predictions"
    dataset.run_with(TRAINING_THREADS, nnunet_command("nnUNetv2_predict"), "-i", images, "-o", predictions,
                     "-d", dataset.dataset_id, "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "--disable_tta",
                     "-npp", "1", "-nps", "1")
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == validated
    for case in validated:  # the new process segments exactly as the trained network did in its final validation
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / case))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(fold / "validation" / case))))

    model = dataset.model_folder(trainer)
    summary_file = tmp_path / "summary.json"
    dataset.run(nnunet_command("nnUNetv2_evaluate_folder"), dataset.raw / "labelsTr", predictions,
                "-djfile", model / "dataset.json", "-pfile", model / "plans.json", "-o", summary_file, "-np", "1",
                "--chill")
    summary = json.loads(summary_file.read_text())
    labels = json.loads((model / "dataset.json").read_text())["labels"]
    assert set(summary["mean"]) == {str(v) for name, v in labels.items() if name != "background"}
    assert all(0.0 <= metrics["Dice"] <= 1.0 or np.isnan(metrics["Dice"]) for metrics in summary["mean"].values())


def test_dynamic_loss_weights_change_in_the_training_log(planned_dataset):
    dataset = planned_dataset(DATASET)
    fold = train(dataset, "nnUNetTrainerDLKUNetSDynamicLoss_quick")
    log = "\n".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    logged = [(float(d), float(c)) for d, c in re.findall(r"loss weights: dice ([\d.]+), ce ([\d.]+)", log)]
    expected = [DynamicLossSchedule()(epoch, QUICK_SCHEDULE.epochs) for epoch in range(QUICK_SCHEDULE.epochs)]
    assert len(logged) == QUICK_SCHEDULE.epochs
    np.testing.assert_allclose(logged, expected, atol=5e-5)  # logged with 4 decimals
    assert logged[0] != logged[1]  # (1.0000, 0.7000) at the first epoch, (0.6500, 0.8500) at the midpoint
    assert "CPU training: freed memory is kept for reuse" in log  # nnUNetExtTrainer on the CPU
