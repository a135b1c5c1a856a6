"""SPA-DCN-Net through the real nnU-Net commands on the converted synthetic US-simulation dataset (2d, CPU): plan the
/32 patch under its own plans name, train the quick variant with it, predict in a new process with the same plans,
evaluate; and the Paper trainer's class weights counted from the preprocessed training cases."""
import json
import shutil

import numpy as np
import torch
from PIL import Image

from nnunet_ext.training.base import QUICK_SCHEDULE
from nnunet_ext.training.spa_dcn_net import label_frequency_weights, nnUNetTrainerSPADCNNetPaper
from tests.conftest import TRAINING_THREADS, nnunet_command

TRAINER = "nnUNetTrainerSPADCNNet_quick"
PLANS = "nnUNetPlans_SPADCN"


def read_segmentation(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_plan_train_predict_evaluate(planned_dataset, tmp_path):
    dataset = planned_dataset("ussim")
    source = json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text())
    dataset.run(nnunet_command("nnunet_ext_plan_spadcnnet"), "-d", dataset.dataset_id)
    plans = json.loads((dataset.preprocessed / f"{PLANS}.json").read_text())
    patch = plans["configurations"]["2d"]["patch_size"]
    assert all(p % 32 == 0 and 0 <= p - s < 32 for p, s in zip(patch, source["configurations"]["2d"]["patch_size"]))
    assert plans["configurations"]["2d"]["data_identifier"] == source["configurations"]["2d"]["data_identifier"]

    dataset.run(nnunet_command("nnUNetv2_train"), dataset.dataset_id, "2d", "0", "-tr", TRAINER, "-p", PLANS,
                "-device", "cpu")
    model = dataset.model_folder(TRAINER, PLANS)
    fold = model / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == QUICK_SCHEDULE.epochs
    weights = checkpoint["network_weights"]
    # training moved the zero-initialised offset/mask predictors of the DCNs
    offset_keys = [k for k in weights if k.endswith("dcn.offset_conv.weight")]
    assert len(offset_keys) == 5 and all(weights[k].abs().sum() > 0 for k in offset_keys)
    used = json.loads((model / "plans.json").read_text())  # what nnUNetv2_predict reads
    assert used["plans_name"] == PLANS and used["configurations"]["2d"]["patch_size"] == patch

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
                     "-d", dataset.dataset_id, "-c", "2d", "-f", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
                     "--disable_tta", "-npp", "1", "-nps", "1")
    assert sorted(p.name for p in predictions.glob(f"*{ending}")) == validated
    for case in validated:  # the new process segments exactly as the trained network did in its final validation
        np.testing.assert_array_equal(read_segmentation(predictions / case),
                                      read_segmentation(fold / "validation" / case))

    summary_file = tmp_path / "summary.json"
    dataset.run(nnunet_command("nnUNetv2_evaluate_folder"), dataset.raw / "labelsTr", predictions,
                "-djfile", model / "dataset.json", "-pfile", model / "plans.json", "-o", summary_file, "-np", "1",
                "--chill")
    summary = json.loads(summary_file.read_text())
    labels = dataset_json["labels"]
    assert set(summary["mean"]) == {str(v) for name, v in labels.items() if name != "background"}
    assert all(0.0 <= m["Dice"] <= 1.0 or np.isnan(m["Dice"]) for m in summary["mean"].values())
    assert len(summary["metric_per_case"]) == len(validated)


def test_paper_class_weights_from_the_training_labels(planned_dataset, monkeypatch):
    dataset = planned_dataset("ussim")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # nnU-Net reads them when used
        monkeypatch.setenv(variable, dataset.env[variable])
    plans = {**json.loads((dataset.preprocessed / "nnUNetPlans.json").read_text()), "continue_training": False}
    dataset_json = json.loads((dataset.raw / "dataset.json").read_text())
    trainer = nnUNetTrainerSPADCNNetPaper(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    counts = trainer.count_training_labels()
    train_keys, _ = trainer.do_split()
    ending = dataset_json["file_ending"]
    raw = np.concatenate([read_segmentation(dataset.raw / "labelsTr" / f"{k}{ending}").ravel() for k in train_keys])
    num_classes = len(dataset_json["labels"])
    # foreground voxels as in the raw labels; background = the rest of nnU-Net's (cropped) training arrays
    np.testing.assert_array_equal(counts[1:], np.bincount(raw, minlength=num_classes)[1:])
    assert 0 < counts[0] <= (raw == 0).sum()
    weights = label_frequency_weights(counts)
    assert weights[1] > 1 > weights[0]  # the organ is the minority class
