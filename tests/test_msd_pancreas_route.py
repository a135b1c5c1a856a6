"""The pancreas-tumour route of the GODC paper: nnU-Net's own ``nnUNetv2_convert_MSD_dataset`` on a
fixture in the real MSD ``Task07_Pancreas`` layout (3-digit ids with gaps, the ``relase`` typo key,
AppleDouble ``._*`` files from the archive). No wrapper of ours is needed; this pins that down."""
import json
import os
import subprocess

import numpy as np
import SimpleITK as sitk

from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

TRAINING_IDS = (1, 4, 10)  # gaps in the numbering, as in the real task
TEST_IDS = (2,)


def write_case(path, seed, label=False):
    rng = np.random.default_rng(seed)
    shape = (12, 20, 24)  # z, y, x
    if label:
        array = np.zeros(shape, np.uint8)
        array[4:9, 6:14, 8:18] = 1
        array[5:7, 8:11, 10:13] = 2
    else:
        array = rng.normal(40, 20, shape).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-200.0, -180.0, -300.0))
    sitk.WriteImage(image, str(path))


def write_task07_pancreas(root):
    task = root / "Task07_Pancreas"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder).mkdir(parents=True)
        (task / folder / "._pancreas_001.nii.gz").write_bytes(b"\x00\x05\x16\x07AppleDouble junk")
    for i in TRAINING_IDS:
        write_case(task / "imagesTr" / f"pancreas_{i:03d}.nii.gz", i)
        write_case(task / "labelsTr" / f"pancreas_{i:03d}.nii.gz", i, label=True)
    for i in TEST_IDS:
        write_case(task / "imagesTs" / f"pancreas_{i:03d}.nii.gz", 100 + i)
    (task / "dataset.json").write_text(json.dumps({
        "name": "Pancreas", "description": "Pancreas and cancer segmentation", "reference": "Memorial Sloan Kettering",
        "licence": "CC-BY-SA 4.0", "relase": "1.0 04/05/2018", "tensorImageSize": "3D",
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": len(TRAINING_IDS), "numTest": len(TEST_IDS),
        "training": [{"image": f"./imagesTr/pancreas_{i:03d}.nii.gz", "label": f"./labelsTr/pancreas_{i:03d}.nii.gz"}
                     for i in TRAINING_IDS],
        "test": [f"./imagesTs/pancreas_{i:03d}.nii.gz" for i in TEST_IDS]}))
    return task


def test_nnunet_msd_converter_handles_task07_pancreas(tmp_path):
    task = write_task07_pancreas(tmp_path / "downloads")
    folders = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir()
    env = {**os.environ, **{name: str(folder) for name, folder in folders.items()}}
    subprocess.run(["nnUNetv2_convert_MSD_dataset", "-i", str(task), "-overwrite_id", "507", "-np", "1"],
                   env=env, check=True, capture_output=True)

    dataset = folders["nnUNet_raw"] / "Dataset507_Pancreas"
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == \
        [f"pancreas_{i:03d}_0000.nii.gz" for i in TRAINING_IDS]  # no ._ files
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == \
        [f"pancreas_{i:03d}.nii.gz" for i in TRAINING_IDS]
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == \
        [f"pancreas_{i:03d}_0000.nii.gz" for i in TEST_IDS]
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "pancreas": 1, "cancer": 2}
    assert dataset_json["channel_names"] == {"0": "CT"} and dataset_json["file_ending"] == ".nii.gz"
    for i in TRAINING_IDS:
        source = sitk.ReadImage(str(task / "imagesTr" / f"pancreas_{i:03d}.nii.gz"))
        converted = sitk.ReadImage(str(dataset / "imagesTr" / f"pancreas_{i:03d}_0000.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(source))
    verify_dataset_integrity(str(dataset), num_processes=1)  # raises on any problem
