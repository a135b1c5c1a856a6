"""DPC-Net through the real nnU-Net commands on the synthetic LiTS release (the README's demo)."""
import json

import numpy as np
import SimpleITK as sitk
import torch

from tests.conftest import TRAINING_THREADS

TRAINER = "nnUNetTrainerDPCNet_quick"


def read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def test_demo_trains_predicts_and_evaluates(demo_run):
    fold = demo_run.model_folder(TRAINER) / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert checkpoint["current_epoch"] == 2  # the quick schedule's 2 epochs ran
    assert any(key.startswith("spacor.") for key in checkpoint["network_weights"])
    # the final validation inside nnUNetv2_train ran with the network switched to a single output
    assert (fold / "validation" / "summary.json").is_file()

    summary_file = demo_run.workdir / "predictions" / "validation" / "summary.json"
    summary = json.loads(summary_file.read_text())
    assert set(summary["mean"]) == {"1", "2"}
    for metrics in summary["mean"].values():
        assert 0.0 <= metrics["Dice"] <= 1.0
    assert str(summary_file) in demo_run.stdout and "mean foreground Dice" in demo_run.stdout


def test_test_volumes_are_segmented_on_their_own_grid(demo_run):
    images = demo_run.workdir / "nnUNet_raw" / demo_run.dataset / "imagesTs"
    predictions = demo_run.workdir / "predictions" / "test"
    cases = sorted(p.name.replace("_0000.nii.gz", "") for p in images.glob("*_0000.nii.gz"))
    assert cases == ["lits_test_000", "lits_test_001"]
    for case in cases:
        image, _ = read(images / f"{case}_0000.nii.gz")
        prediction, labels = read(predictions / f"{case}.nii.gz")
        assert prediction.GetSize() == image.GetSize()
        np.testing.assert_allclose(prediction.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(prediction.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert set(np.unique(labels)) <= {0, 1, 2}


def test_prediction_in_a_new_process_reproduces_the_final_validation(demo_run, tmp_path):
    """``nnUNetv2_predict`` rebuilds DPC-Net from the checkpoint in a fresh process (trainer looked
    up by ``checkpoint['trainer_name']``) and, with the training's thread count, must segment exactly as the trained
    network did (the demo's own predictions ran single-threaded: see ``TRAINING_THREADS``)."""
    in_training = demo_run.model_folder(TRAINER) / "fold_0" / "validation"
    new_process = tmp_path / "predictions"
    demo_run.run_with(TRAINING_THREADS, "nnUNetv2_predict", "-i", demo_run.workdir / "validation_images",
                      "-o", new_process, "-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu",
                      "--disable_tta", "-npp", "1", "-nps", "1")
    cases = sorted(p.name for p in new_process.glob("*.nii.gz"))
    assert cases and cases == sorted(p.name for p in in_training.glob("*.nii.gz"))
    for case in cases:
        np.testing.assert_array_equal(read(new_process / case)[1], read(in_training / case)[1])


def test_continue_training_reloads_the_checkpoint(demo_run):
    fold = demo_run.model_folder(TRAINER) / "fold_0"
    before = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    result = demo_run.run("nnUNetv2_train", "501", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--c")
    assert "Cannot continue training" not in result.stdout
    after = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # nothing left to train: the reloaded weights were saved back unchanged, epoch count kept
    assert after["current_epoch"] == before["current_epoch"] == 2
    for key, value in before["network_weights"].items():
        torch.testing.assert_close(after["network_weights"][key], value, rtol=0, atol=0)
    assert "Mean Validation Dice" in result.stdout
