"""LFAM + GODC through the real nnU-Net commands, on the demo's preprocessed synthetic LiTS data, fine-tuned from a
plain nnU-Net checkpoint of the same plan (``-pretrained_weights``)."""
import json

import numpy as np
import SimpleITK as sitk
import torch

from tests.conftest import TRAINING_THREADS

TRAINER = "nnUNetTrainerLFAMGODC_quick"


def test_train_predict_evaluate(demo_run, plain_checkpoint, tmp_path):
    train = demo_run.run("nnUNetv2_train", "501", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu",
                         "-pretrained_weights", plain_checkpoint)
    assert "Pretrained weights from" in train.stdout and "lfam" in train.stdout
    fold = demo_run.model_folder(TRAINER) / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == 2
    lfam_keys = [k for k in checkpoint["network_weights"] if k.startswith("lfam.")]
    assert lfam_keys, "the checkpoint holds no LFAM weights"
    # training moved the deformable kernels away from their zero initialisation
    assert any(torch.any(checkpoint["network_weights"][k] != 0) for k in lfam_keys if k.endswith("dcn.weight"))

    predictions = tmp_path / "predictions"
    demo_run.run_with(TRAINING_THREADS, "nnUNetv2_predict", "-i", demo_run.workdir / "validation_images",
                      "-o", predictions, "-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu",
                      "--disable_tta", "-npp", "1", "-nps", "1")
    cases = sorted(p.name for p in predictions.glob("*.nii.gz"))
    assert cases and cases == sorted(p.name for p in (fold / "validation").glob("*.nii.gz"))
    for case in cases:  # the new process segments exactly as the trained network did
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / case))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(fold / "validation" / case))))

    model = demo_run.model_folder(TRAINER)
    summary_file = tmp_path / "summary.json"
    demo_run.run("nnUNetv2_evaluate_folder", demo_run.workdir / "nnUNet_raw" / demo_run.dataset / "labelsTr",
                 predictions, "-djfile", model / "dataset.json", "-pfile", model / "plans.json",
                 "-o", summary_file, "-np", "1", "--chill")
    summary = json.loads(summary_file.read_text())
    assert set(summary["mean"]) == {"1", "2"}
    assert all(0.0 <= metrics["Dice"] <= 1.0 for metrics in summary["mean"].values())
