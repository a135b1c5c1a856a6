"""``nnunet_ext_evaluate``: ``nnUNetv2_evaluate_folder`` with the papers' metrics (``nnunet_ext.evaluation.metrics``).

    nnunet_ext_evaluate GT_FOLDER PRED_FOLDER -djfile dataset.json -pfile plans.json [-o summary.json] [-np 4]

Takes ``nnUNetv2_evaluate_folder``'s arguments and reads the files the same way (the reader of the dataset.json, the
labels or regions and the ignore label of the plans' label manager). Writes nnU-Net's ``summary.json`` shape
(``metric_per_case``, ``mean``, ``foreground_mean``) with ``Precision``, ``Recall``, ``RVD``, ``HD95`` and ``ASSD``
next to ``Dice`` and ``IoU`` (Dice and IoU are nnU-Net's: same numbers), plus ``std`` and ``nan_count`` per label
and metric (NaN values are excluded from the means and counted), and a CSV with one row per case and label.

Bad input stops with an error naming every bad case before anything is written: a prediction without a reference,
a reference without a prediction (unless ``--chill``), a shape or spacing mismatch, an unreadable file. With
``--flag-bad`` the bad cases get a row with the error in the CSV and in ``flagged`` and are left out of the means.
Both files are written atomically (a temporary file renamed into place), so they are complete or absent.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key, save_summary_json
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from nnunet_ext.evaluation.metrics import BOTH_EMPTY, COUNTS, METRICS, case_metrics


class EvaluationError(RuntimeError):
    """Bad input: the message names every bad case and what is wrong with it."""


def _read(reader, path: str):
    try:
        return reader.read_seg(path)
    except Exception as error:  # every reader raises its own types; report which file could not be read
        raise EvaluationError(f"cannot read {path}: {type(error).__name__}: {error}") from error


def evaluate_case(reference_file: str, prediction_file: str, reader, labels_or_regions: list,
                  ignore_label: Optional[int], both_empty: str, spacing_tolerance: float) -> dict:
    """One case in nnU-Net's ``metric_per_case`` shape, or ``{"error": ...}`` for bad input."""
    entry = {"reference_file": reference_file, "prediction_file": prediction_file}
    try:
        reference, reference_properties = _read(reader, reference_file)
        prediction, prediction_properties = _read(reader, prediction_file)
        if reference.shape != prediction.shape:
            raise EvaluationError(f"shape mismatch: reference {reference.shape[1:]}, prediction "
                                  f"{prediction.shape[1:]}")
        spacing = np.asarray(reference_properties["spacing"], dtype=float)
        prediction_spacing = np.asarray(prediction_properties["spacing"], dtype=float)
        if not np.allclose(spacing, prediction_spacing, rtol=spacing_tolerance, atol=0):
            raise EvaluationError(f"spacing mismatch: reference {tuple(spacing)}, prediction "
                                  f"{tuple(prediction_spacing)}")
        entry["metrics"] = case_metrics(reference[0], prediction[0], spacing, labels_or_regions, ignore_label,
                                        both_empty)
    except EvaluationError as error:
        entry["error"] = str(error)
    return entry


def _evaluate_case_star(arguments):
    return evaluate_case(*arguments)


def _case_id(prediction_file: str, file_ending: str) -> str:
    return os.path.basename(prediction_file)[:-len(file_ending)]


def _pair_files(gt_folder: Path, pred_folder: Path, file_ending: str, chill: bool) -> List[tuple]:
    predictions = sorted(p.name for p in pred_folder.iterdir() if p.name.endswith(file_ending) and p.is_file())
    references = sorted(p.name for p in gt_folder.iterdir() if p.name.endswith(file_ending) and p.is_file())
    if not predictions:
        raise EvaluationError(f"no predictions ending in {file_ending} in {pred_folder}")
    problems = [f"{name[:-len(file_ending)]}: prediction {pred_folder / name} has no reference in {gt_folder}"
                for name in predictions if name not in references]
    if not chill:
        problems += [f"{name[:-len(file_ending)]}: reference {gt_folder / name} has no prediction in {pred_folder} "
                     "(--chill evaluates the predictions present)" for name in references if name not in predictions]
    if problems:
        raise EvaluationError("\n".join(problems))
    return [(str(gt_folder / name), str(pred_folder / name)) for name in predictions]


def select_labels(available: list, wanted: Optional[Sequence[str]]) -> list:
    """The labels/regions to evaluate: all of the plans' foreground, or those named (``2`` or ``(1, 2)``)."""
    if not wanted:
        return list(available)
    by_key = {label_or_region_to_key(r).replace(" ", ""): r for r in available}
    unknown = [w for w in wanted if w.replace(" ", "") not in by_key]
    if unknown:
        raise EvaluationError(f"unknown label(s) or region(s) {unknown}; the dataset has "
                              f"{[label_or_region_to_key(r) for r in available]}")
    return [by_key[w.replace(" ", "")] for w in wanted]


def aggregate(results: List[dict], labels_or_regions: list) -> dict:
    """nnU-Net's ``mean`` and ``foreground_mean`` (NaN excluded per label), with ``std`` and ``nan_count``."""
    good = [r for r in results if "error" not in r]
    if not good:
        raise EvaluationError("no case could be evaluated")
    mean, std, nan_count = {}, {}, {}
    for r in labels_or_regions:
        mean[r], std[r], nan_count[r] = {}, {}, {}
        for m in METRICS + COUNTS:
            values = np.array([case["metrics"][r][m] for case in good], dtype=float)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN metric: NaN mean, counted below
                mean[r][m] = float(np.nanmean(values))
                if m in METRICS:
                    std[r][m] = float(np.nanstd(values))
            if m in METRICS:
                nan_count[r][m] = int(np.isnan(values).sum())
    foreground = [r for r in labels_or_regions if r not in (0, "0")]
    foreground_mean = {m: float(np.mean([mean[r][m] for r in foreground])) for m in METRICS + COUNTS}
    return {"mean": mean, "foreground_mean": foreground_mean, "std": std, "nan_count": nan_count}


def _atomic_targets(*paths: Path) -> List[Path]:
    temporaries = []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        temporaries.append(Path(name))
    return temporaries


def write_outputs(summary: dict, output_file: Path, csv_file: Path, file_ending: str) -> None:
    """``summary.json`` (nnU-Net's keys) and the per-case CSV, each complete or not there."""
    json_tmp, csv_tmp = _atomic_targets(output_file, csv_file)
    try:
        converted = dict(summary)
        for key in ("std", "nan_count"):
            converted[key] = {label_or_region_to_key(k): v for k, v in summary[key].items()}
        save_summary_json(converted, str(json_tmp))
        with open(csv_tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case", "label"] + list(METRICS + COUNTS) + ["reference_file", "prediction_file",
                                                                          "error"])
            for case in summary["metric_per_case"] + summary["flagged"]:
                case_id = _case_id(case["prediction_file"], file_ending)
                if "error" in case:
                    writer.writerow([case_id, ""] + [""] * len(METRICS + COUNTS) +
                                    [case["reference_file"], case["prediction_file"], case["error"]])
                    continue
                for r, values in case["metrics"].items():
                    writer.writerow([case_id, label_or_region_to_key(r)] + [values[m] for m in METRICS + COUNTS] +
                                    [case["reference_file"], case["prediction_file"], ""])
        os.replace(json_tmp, output_file)
        os.replace(csv_tmp, csv_file)
    finally:
        for tmp in (json_tmp, csv_tmp):
            tmp.unlink(missing_ok=True)


def evaluate_folder(gt_folder, pred_folder, dataset_json_file, plans_file, output_file=None,
                    num_processes: int = default_num_processes, chill: bool = False,
                    labels: Optional[Sequence[str]] = None, both_empty: str = "nan", flag_bad: bool = False,
                    csv_file=None, spacing_tolerance: float = 1e-4, progress: bool = True) -> dict:
    """Evaluate every prediction of ``pred_folder``; returns the summary (label keys as ints/tuples) after writing
    ``output_file`` (default ``pred_folder/summary.json``) and ``csv_file`` (default: ``output_file`` as .csv)."""
    gt_folder, pred_folder = Path(gt_folder), Path(pred_folder)
    for folder in (gt_folder, pred_folder):
        if not folder.is_dir():
            raise EvaluationError(f"{folder} is not a folder")
    dataset_json = load_json(str(dataset_json_file))
    file_ending = dataset_json["file_ending"]
    output_file = Path(output_file) if output_file else pred_folder / "summary.json"
    if output_file.suffix != ".json":
        raise EvaluationError(f"the output file {output_file} must end with .json")
    csv_file = Path(csv_file) if csv_file else output_file.with_suffix(".csv")
    pairs = _pair_files(gt_folder, pred_folder, file_ending, chill)
    reader = determine_reader_writer_from_dataset_json(dataset_json, pairs[0][0])()
    label_manager = PlansManager(str(plans_file)).get_label_manager(dataset_json)
    available = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    labels_or_regions = select_labels(available, labels)
    jobs = [(ref, pred, reader, labels_or_regions, label_manager.ignore_label, both_empty, spacing_tolerance)
            for ref, pred in pairs]
    bar = dict(total=len(jobs), desc="evaluating", unit="case", disable=not progress, file=sys.stderr)
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            results = list(tqdm(pool.imap(_evaluate_case_star, jobs), **bar))
    else:
        results = [evaluate_case(*job) for job in tqdm(jobs, **bar)]
    flagged = [r for r in results if "error" in r]
    if flagged and not flag_bad:
        raise EvaluationError("\n".join(f"{_case_id(r['prediction_file'], file_ending)}: {r['error']}"
                                        for r in flagged) + "\n(--flag-bad reports them as rows and goes on)")
    summary = {"metric_per_case": [r for r in results if "error" not in r], **aggregate(results, labels_or_regions),
               "flagged": flagged, "settings": {"both_empty": both_empty, "ignore_label": label_manager.ignore_label,
                                                "labels_or_regions": [label_or_region_to_key(r)
                                                                      for r in labels_or_regions]}}
    recursive_fix_for_json_export(summary)
    write_outputs(summary, output_file, csv_file, file_ending)
    return summary


def print_summary(summary: dict) -> None:
    print(f"{'label':>12}" + "".join(f"{m:>11}" for m in METRICS))
    for r, values in summary["mean"].items():
        print(f"{label_or_region_to_key(r):>12}" + "".join(f"{values[m]:>11.4f}" for m in METRICS))
    print(f"{'foreground':>12}" + "".join(f"{summary['foreground_mean'][m]:>11.4f}" for m in METRICS))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gt_folder", help="folder with the reference segmentations")
    parser.add_argument("pred_folder", help="folder with the predicted segmentations")
    parser.add_argument("-djfile", required=True, help="dataset.json file")
    parser.add_argument("-pfile", required=True, help="plans.json file")
    parser.add_argument("-o", default=None, help="output .json (default: pred_folder/summary.json)")
    parser.add_argument("-np", type=int, default=default_num_processes, help=f"processes (default "
                                                                             f"{default_num_processes})")
    parser.add_argument("--chill", action="store_true", help="do not stop if references lack a prediction")
    parser.add_argument("--labels", nargs="+", help="evaluate only these labels or regions, e.g. 2 or '(1, 2)'")
    parser.add_argument("--both-empty", choices=BOTH_EMPTY, default="nan",
                        help="metrics when reference and prediction are both empty: nan (nnU-Net's, default) or "
                             "perfect (Dice/IoU/precision/recall 1, RVD/HD95/ASSD 0)")
    parser.add_argument("--flag-bad", action="store_true", help="bad cases become flagged rows instead of an error")
    parser.add_argument("--csv", default=None, help="per-case CSV (default: the output file with .csv)")
    parser.add_argument("--spacing-tolerance", type=float, default=1e-4,
                        help="relative spacing difference allowed between reference and prediction")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        summary = evaluate_folder(args.gt_folder, args.pred_folder, args.djfile, args.pfile, args.o, args.np,
                                  args.chill, args.labels, args.both_empty, args.flag_bad, args.csv,
                                  args.spacing_tolerance, progress=not args.quiet)
    except EvaluationError as error:
        sys.exit(f"error: {error}")
    if not args.quiet:
        print_summary(summary)
        for case in summary["flagged"]:
            print(f"flagged: {case['prediction_file']}: {case['error']}")


if __name__ == "__main__":
    main()
