"""SCRNet through the real nnU-Net commands on the converted synthetic BUSI dataset (2d, CPU): train the quick
variant, predict in a new process, evaluate."""
import json
import shutil

import numpy as np
import torch
from PIL import Image

from nnunet_ext.training.base import QUICK_SCHEDULE
from tests.conftest import TRAINING_THREADS, nnunet_command

TRAINER = "nnUNetTrainerSCRNet_quick"


def read_segmentation(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_train_predict_evaluate(planned_dataset, tmp_path):
    dataset = planned_dataset("busi")
    dataset.run(nnunet_command("nnUNetv2_train"), dataset.dataset_id, "2d", "0", "-tr", TRAINER, "-device", "cpu")
    fold = dataset.model_folder(TRAINER) / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == QUICK_SCHEDULE.epochs
    weights = checkpoint["network_weights"]
    assert any(k.startswith("scrms.0.fam.ccapm_high.") for k in weights)
    # training moved the path weights of the CCAPMs away from their initial 0.5
    assert any(weights[k].item() != 0.5 for k in weights if k.endswith(("w_conv", "w_cross")))

    dataset_json = json.loads((dataset.raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    validated = sorted(p.name for p in (fold / "validation").glob(f"*{ending}"))
    assert validated, "the final validation wrote no segmentation"
    images = tmp_path / "images"
    images.mkdir()
    for case in validated:
        for image in (dataset.raw / "imagesTr").glob(f"{case[:-len(ending)]}_[0-9][0-9][0-9][0-9]{ending}"):
            shutil.copy(image, images / image.name)
    predictions = tmp_path / "predictions"
    dataset.run_with(TRAINING_THREADS, nnunet_command("nnUNetv2_predict"), "-i", images, "-o", predictions,
                     "-d", dataset.dataset_id, "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta",
                     "-npp", "1", "-nps", "1")
    assert sorted(p.name for p in predictions.glob(f"*{ending}")) == validated
    for case in validated:  # the new process segments exactly as the trained network did in its final validation
        np.testing.assert_array_equal(read_segmentation(predictions / case),
                                      read_segmentation(fold / "validation" / case))

    model = dataset.model_folder(TRAINER)
    summary_file = tmp_path / "summary.json"
    dataset.run(nnunet_command("nnUNetv2_evaluate_folder"), dataset.raw / "labelsTr", predictions,
                "-djfile", model / "dataset.json", "-pfile", model / "plans.json", "-o", summary_file, "-np", "1",
                "--chill")
    summary = json.loads(summary_file.read_text())
    labels = dataset_json["labels"]
    assert set(summary["mean"]) == {str(v) for name, v in labels.items() if name != "background"}
    assert all(0.0 <= m["Dice"] <= 1.0 or np.isnan(m["Dice"]) for m in summary["mean"].values())
    assert len(summary["metric_per_case"]) == len(validated)
