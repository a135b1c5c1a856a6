"""``nnunet_ext_evaluate`` on real nnU-Net files: predictions of the real ``nnUNetv2_predict`` (the demo's), agreement
with ``nnUNetv2_evaluate_folder`` on Dice and IoU (labels, regions, ignore label; 3D NIfTI and 2D PNG), bad input."""
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunet_ext.evaluation.metrics import METRICS
from tests.conftest import nnunet_command

ENDING = ".nii.gz"


def evaluate(env, gt, pred, dataset_json, plans, output, *options, check=True):
    result = subprocess.run([sys.executable, "-m", "nnunet_ext.evaluation.evaluate", str(gt), str(pred),
                             "-djfile", str(dataset_json), "-pfile", str(plans), "-o", str(output), "-np", "1",
                             "--quiet", *map(str, options)], env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def nnunet_evaluate(env, gt, pred, dataset_json, plans, output):
    subprocess.run([nnunet_command("nnUNetv2_evaluate_folder"), str(gt), str(pred), "-djfile", str(dataset_json),
                    "-pfile", str(plans), "-o", str(output), "-np", "1", "--chill"], env=env, check=True,
                   capture_output=True)
    return json.loads(Path(output).read_text())


def assert_same_dice_iou(ours: dict, theirs: dict):
    """Dice and IoU of every case and label, and their means, agree to 1e-6 (NaN where nnU-Net has NaN)."""
    assert len(ours["metric_per_case"]) == len(theirs["metric_per_case"])
    by_file = {Path(c["prediction_file"]).name: c["metrics"] for c in ours["metric_per_case"]}
    pairs = [(by_file[Path(c["prediction_file"]).name], c["metrics"]) for c in theirs["metric_per_case"]]
    pairs.append((ours["mean"], theirs["mean"]))
    for our_metrics, their_metrics in pairs:
        assert set(our_metrics) == set(their_metrics)
        for label in their_metrics:
            for metric in ("Dice", "IoU"):
                a, b = our_metrics[label][metric], their_metrics[label][metric]
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-6, (label, metric, a, b)
    for metric in ("Dice", "IoU"):
        assert ours["foreground_mean"][metric] == pytest.approx(theirs["foreground_mean"][metric], abs=1e-6)


@pytest.fixture(scope="module")
def demo_files(demo_run):
    """The demo's reference labels, validation predictions (``nnUNetv2_predict``) and its nnU-Net summary."""
    model = demo_run.model_folder("nnUNetTrainerDPCNet_quick")
    predictions = demo_run.workdir / "predictions" / "validation"
    return {"gt": demo_run.workdir / "nnUNet_raw" / demo_run.dataset / "labelsTr", "pred": predictions,
            "dataset_json": model / "dataset.json", "plans": model / "plans.json",
            "nnunet_summary": json.loads((predictions / "summary.json").read_text()), "env": demo_run.env}


def test_agrees_with_nnunet_evaluate_folder_on_real_predictions(demo_files, tmp_path):
    f = demo_files
    output = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "nnunet_ext.evaluation.evaluate", f["gt"], f["pred"],
                             "-djfile", f["dataset_json"], "-pfile", f["plans"], "-o", output, "-np", "2",
                             "--chill"], env=f["env"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "foreground" in result.stdout and "100%" in result.stderr          # table and progress bar
    ours = json.loads(output.read_text())
    assert_same_dice_iou(ours, f["nnunet_summary"])
    cases = len(ours["metric_per_case"])
    assert cases == len(f["nnunet_summary"]["metric_per_case"]) >= 2
    for label in ("1", "2"):
        assert set(METRICS) <= set(ours["mean"][label]) and set(METRICS) == set(ours["nan_count"][label])
        # a case's metrics are NaN only where the conventions say so; the means leave them out
        values = [c["metrics"][label]["HD95"] for c in ours["metric_per_case"]]
        assert ours["nan_count"][label]["HD95"] == sum(math.isnan(v) for v in values)
        finite = [v for v in values if not math.isnan(v)]
        if finite:
            assert ours["mean"][label]["HD95"] == pytest.approx(np.mean(finite))
    rows = list(csv.DictReader(output.with_suffix(".csv").open()))
    assert len(rows) == 2 * cases and {r["label"] for r in rows} == {"1", "2"}
    assert all(r["error"] == "" for r in rows)


def test_regions_ignore_label_and_label_subset_agree_with_nnunet(demo_files, tmp_path):
    """A region-based dataset.json ((1, 2) = liver incl. tumour, 2 = tumour) with ignore label 3 painted into the
    references: our Dice and IoU per region equal nnU-Net's, and a region subset is evaluated alone."""
    f = demo_files
    gt = tmp_path / "gt"
    gt.mkdir()
    predictions = sorted(p for p in f["pred"].iterdir() if p.name.endswith(ENDING))
    for prediction in predictions:
        image = sitk.ReadImage(str(f["gt"] / prediction.name))
        array = sitk.GetArrayFromImage(image)
        array[:, :, :8] = 3                                       # ignore a slab of every reference
        painted = sitk.GetImageFromArray(array)
        painted.CopyInformation(image)
        sitk.WriteImage(painted, str(gt / prediction.name))
    dataset = json.loads(f["dataset_json"].read_text())
    dataset["labels"] = {"background": 0, "liver": [1, 2], "tumour": 2, "ignore": 3}
    dataset["regions_class_order"] = [1, 2]
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps(dataset))
    theirs = nnunet_evaluate(f["env"], gt, f["pred"], dataset_json, f["plans"], tmp_path / "nnunet.json")
    evaluate(f["env"], gt, f["pred"], dataset_json, f["plans"], tmp_path / "ours.json", "--chill")
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert set(ours["mean"]) == {"(1, 2)", "2"}    # a one-label region is the label (nnU-Net)
    assert ours["settings"]["ignore_label"] == 3
    assert_same_dice_iou(ours, theirs)
    evaluate(f["env"], gt, f["pred"], dataset_json, f["plans"], tmp_path / "subset.json", "--chill",
             "--labels", "(1, 2)")
    subset = json.loads((tmp_path / "subset.json").read_text())
    assert set(subset["mean"]) == {"(1, 2)"}
    assert subset["mean"]["(1, 2)"] == ours["mean"]["(1, 2)"]


def write_like(source: Path, target: Path, array=None, spacing=None):
    image = sitk.ReadImage(str(source))
    out = sitk.GetImageFromArray(array if array is not None else sitk.GetArrayFromImage(image))
    if array is None or array.shape == sitk.GetArrayFromImage(image).shape:
        out.CopyInformation(image)
    if spacing is not None:
        out.SetSpacing(spacing)
    sitk.WriteImage(out, str(target))


def test_bad_input_names_the_cases_and_writes_nothing(demo_files, tmp_path):
    f = demo_files
    pred = tmp_path / "pred"
    shutil.copytree(f["pred"], pred, ignore=shutil.ignore_patterns("*.json"))
    # one more case, predicted perfectly, so that one stays good when two are spoilt below
    extra = next(p for p in sorted(f["gt"].iterdir()) if not (pred / p.name).exists())
    shutil.copy(extra, pred / extra.name)
    cases = sorted(p.name for p in pred.iterdir())
    assert len(cases) >= 3
    output = tmp_path / "out" / "summary.json"
    args = (f["env"], f["gt"], pred, f["dataset_json"], f["plans"], output)

    # a prediction without a reference
    write_like(pred / cases[0], pred / "lits_999.nii.gz")
    result = evaluate(*args, "--chill", check=False)
    assert result.returncode != 0 and "lits_999" in result.stderr and "has no reference" in result.stderr
    (pred / "lits_999.nii.gz").unlink()
    # a reference without a prediction (nnU-Net's rule: an error unless --chill)
    result = evaluate(*args, check=False)
    assert result.returncode != 0 and "has no prediction" in result.stderr
    assert not output.parent.exists() or not any(output.parent.iterdir())

    # shape mismatch, spacing mismatch, unreadable file: all three named in one error, nothing written
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / cases[0])))
    write_like(f["gt"] / cases[0], pred / cases[0], array=first[:, :-3])
    write_like(f["gt"] / cases[1], pred / cases[1], spacing=(0.5, 0.5, 3.0))
    (pred / "lits_998.nii.gz").write_bytes(b"not a nifti file")
    gt = tmp_path / "gt"
    shutil.copytree(f["gt"], gt)
    shutil.copy(f["gt"] / cases[0], gt / "lits_998.nii.gz")
    args = (f["env"], gt, pred, f["dataset_json"], f["plans"], output)
    result = evaluate(*args, "--chill", check=False)
    assert result.returncode != 0
    case = cases[0][:-len(ENDING)], cases[1][:-len(ENDING)]
    assert f"{case[0]}: shape mismatch" in result.stderr
    assert f"{case[1]}: spacing mismatch" in result.stderr
    assert "lits_998: cannot read" in result.stderr and str(pred / "lits_998.nii.gz") in result.stderr
    assert not output.parent.exists() or not any(output.parent.iterdir())

    # --flag-bad: the three cases become flagged rows, the others are evaluated
    evaluate(*args, "--chill", "--flag-bad")
    summary = json.loads(output.read_text())
    assert len(summary["flagged"]) == 3 and len(summary["metric_per_case"]) == len(cases) - 2
    rows = list(csv.DictReader(output.with_suffix(".csv").open()))
    flagged = {r["case"]: r["error"] for r in rows if r["error"]}
    assert set(flagged) == {case[0], case[1], "lits_998"}
    assert flagged[case[0]].startswith("shape mismatch") and flagged[case[1]].startswith("spacing mismatch")
    assert sorted(p.name for p in output.parent.iterdir()) == ["summary.csv", "summary.json"]  # no temporaries


def test_2d_png_dataset_agrees_with_nnunet(planned_dataset, tmp_path):
    """BUSI (2D PNG, nnU-Net's NaturalImage2DIO): shifted references as predictions; HD95 of a shift is 2D."""
    busi = planned_dataset("busi")
    gt = busi.raw / "labelsTr"
    pred = tmp_path / "pred"
    pred.mkdir()
    shift = 3
    for label in sorted(gt.glob("*.png")):
        array = np.asarray(Image.open(label))
        shifted = np.zeros_like(array)
        shifted[:, shift:] = array[:, :-shift]
        Image.fromarray(shifted).save(pred / label.name)
    dataset_json, plans = busi.preprocessed / "dataset.json", busi.preprocessed / "nnUNetPlans.json"
    theirs = nnunet_evaluate(busi.env, gt, pred, dataset_json, plans, tmp_path / "nnunet.json")
    evaluate(busi.env, gt, pred, dataset_json, plans, tmp_path / "ours.json")
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert_same_dice_iou(ours, theirs)
    for case in ours["metric_per_case"]:
        metrics = case["metrics"]["1"]
        if metrics["n_ref"] and metrics["TP"]:
            # a shift by 3 pixels (spacing 1): no surface distance exceeds 3, the volume is unchanged unless the
            # object touches the border; a 3D reading of the (1, H, W) image would give distances of 0
            assert 0 < metrics["HD95"] <= shift and 0 < metrics["ASSD"] <= shift
