"""``nnunet_ext_compare``: train, predict, evaluate and cost several trainers on one dataset and write a report.

    nnunet_ext_compare 3 3d_fullres -tr nnUNetTrainer nnUNetTrainerDPCNet -f 0 1 2 3 4 -o comparison_lits

For every trainer and fold, with the stock nnU-Net commands in new processes (the nnU-Net folders and
``nnUNet_extTrainer`` come from the environment; ``nnUNet_extTrainer`` defaults to this package's trainers):

1. ``nnUNetv2_train`` unless ``fold_N/checkpoint_final.pth`` exists (reused; ``--retrain`` trains again); an
   interrupted training with a ``checkpoint_latest.pth`` continues with ``--c``,
2. ``nnUNetv2_predict`` of the fold's validation cases (``splits_final.json``; with ``--test-set`` the ``imagesTs``
   cases, scored against ``labelsTs``) into ``OUT/predictions/<trainer>/fold_N``,
3. ``nnunet_ext_evaluate``'s evaluation into ``OUT/evaluation/<trainer>/fold_N/summary.json`` (+ CSV),

then the cost of every trainer's network on the plan (``nnunet_ext.evaluation.cost``, ratios to ``nnUNetTrainer``
measured in the same run) into ``OUT/cost.json``, and the report (``nnunet_ext.evaluation.report``) into
``OUT/report.md``. It resumes where it stopped: a prediction folder is renamed into place only when complete and
records the checkpoint it came from (it is redone when that checkpoint changes), an evaluation is redone only with its
prediction, the cost only when the trainers or settings change. Each command's output goes to ``OUT/logs/``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from nnunet_ext.environment import trainers_folder
from nnunet_ext.evaluation.evaluate import EvaluationError, evaluate_folder

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class ComparisonError(RuntimeError):
    """A step failed or the inputs are incomplete; the message says which and where its log is."""


def _console_script(name: str) -> str:
    """An nnU-Net console script of this interpreter's environment, else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _write_json_atomic(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


@dataclass
class Comparison:
    """One comparison: ``dataset`` is an id or ``DatasetXXX_Name`` under ``env``'s nnU-Net folders."""
    dataset: str
    configuration: str
    trainers: Sequence[str]
    folds: Sequence[int]
    output: Path
    plans: str = "nnUNetPlans"
    device: str = "cpu"
    disable_tta: bool = False
    test_set: bool = False
    retrain: bool = False
    measure_cost: bool = True
    cost_repeats: int = 3
    num_processes: int = 1
    env: Dict[str, str] = field(default_factory=lambda: dict(os.environ))
    log: Callable[[str], None] = field(default=lambda message: print(message, flush=True))

    def __post_init__(self):
        self.output = Path(self.output).resolve()
        self.env = {"nnUNet_extTrainer": str(trainers_folder()), **self.env}
        missing = [name for name in NNUNET_FOLDERS if not self.env.get(name)]
        if missing:
            raise ComparisonError(f"set the nnU-Net folder variable(s) {', '.join(missing)}")
        self.dataset_name = self._dataset_name(str(self.dataset))
        self.raw = Path(self.env["nnUNet_raw"]) / self.dataset_name
        self.preprocessed = Path(self.env["nnUNet_preprocessed"]) / self.dataset_name
        self.results = Path(self.env["nnUNet_results"]) / self.dataset_name
        self.plans_file = self.preprocessed / f"{self.plans}.json"
        if not self.plans_file.is_file():
            raise ComparisonError(f"no plans {self.plans_file}: run nnUNetv2_plan_and_preprocess first")
        self.dataset_json = json.loads((self.preprocessed / "dataset.json").read_text())
        self.file_ending = self.dataset_json["file_ending"]

    def _dataset_name(self, dataset: str) -> str:
        if not dataset.isdigit():
            return dataset
        root = Path(self.env["nnUNet_preprocessed"])
        found = sorted(root.glob(f"Dataset{int(dataset):03d}_*"))
        if len(found) != 1:
            raise ComparisonError(f"dataset {dataset}: expected one folder Dataset{int(dataset):03d}_* in {root}, "
                                  f"found {[p.name for p in found]}")
        return found[0].name

    # --- paths
    def model_folder(self, trainer: str) -> Path:
        return self.results / f"{trainer}__{self.plans}__{self.configuration}"

    def checkpoint(self, trainer: str, fold: int, name: str = "checkpoint_final.pth") -> Path:
        return self.model_folder(trainer) / f"fold_{fold}" / name

    def prediction_folder(self, trainer: str, fold: int) -> Path:
        return self.output / "predictions" / trainer / f"fold_{fold}"

    def summary_file(self, trainer: str, fold: int) -> Path:
        return self.output / "evaluation" / trainer / f"fold_{fold}" / "summary.json"

    @property
    def labels_folder(self) -> Path:
        return self.raw / ("labelsTs" if self.test_set else "labelsTr")

    # --- steps
    def run(self, name: str, command: list) -> None:
        """One command in a new process, its output into ``OUT/logs/<name>.log``; a failure raises with the tail."""
        log_file = self.output / "logs" / f"{name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"  $ {' '.join(map(str, command))}")
        start = time.perf_counter()
        with open(log_file, "w") as handle:
            result = subprocess.run([str(c) for c in command], env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.log(f"    {time.perf_counter() - start:.0f} s, log {log_file}")
        if result.returncode != 0:
            tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
            raise ComparisonError(f"{name} failed (exit code {result.returncode}); last lines of {log_file}:\n{tail}")

    def train(self, trainer: str, fold: int) -> None:
        if self.checkpoint(trainer, fold).is_file() and not self.retrain:
            self.log(f"{trainer} fold {fold}: trained, reusing {self.checkpoint(trainer, fold)}")
            return
        resume = self.checkpoint(trainer, fold, "checkpoint_latest.pth").is_file() and not self.retrain
        self.log(f"{trainer} fold {fold}: {'continuing the training' if resume else 'training'}")
        self.run(f"train_{trainer}_fold_{fold}",
                 [_console_script("nnUNetv2_train"), self.dataset_name, self.configuration, fold, "-tr", trainer,
                  "-p", self.plans, "-device", self.device] + (["--c"] if resume else []))

    def cases(self, fold: int) -> List[str]:
        if self.test_set:
            images = self.raw / "imagesTs"
            if not images.is_dir() or not self.labels_folder.is_dir():
                raise ComparisonError(f"--test-set needs {images} and {self.labels_folder}")
            return sorted({p.name[:-len(self.file_ending) - 5] for p in images.iterdir()
                           if p.name.endswith(self.file_ending)})
        splits = json.loads((self.preprocessed / "splits_final.json").read_text())
        if fold >= len(splits):
            raise ComparisonError(f"fold {fold} is not in {self.preprocessed / 'splits_final.json'} "
                                  f"({len(splits)} folds)")
        return sorted(splits[fold]["val"])

    def input_folder(self, fold: int) -> Path:
        """The cases to predict (all their channels) in a folder of links, as ``nnUNetv2_predict -i`` wants."""
        images = self.raw / ("imagesTs" if self.test_set else "imagesTr")
        folder = self.output / "inputs" / ("test" if self.test_set else f"fold_{fold}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for case in self.cases(fold):
            for channel in range(len(self.dataset_json["channel_names"])):
                name = f"{case}_{channel:04d}{self.file_ending}"
                if not (images / name).is_file():
                    raise ComparisonError(f"case {case}: image {images / name} is missing")
                (folder / name).symlink_to(images / name)
        return folder

    def prediction_source(self, trainer: str, fold: int) -> dict:
        checkpoint = self.checkpoint(trainer, fold)
        stat = checkpoint.stat()
        return {"checkpoint": str(checkpoint), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size,
                "disable_tta": self.disable_tta, "test_set": self.test_set, "cases": self.cases(fold)}

    def predict(self, trainer: str, fold: int) -> bool:
        """Predict unless a complete prediction of the same checkpoint exists; True when it predicted."""
        folder = self.prediction_folder(trainer, fold)
        source = self.prediction_source(trainer, fold)
        marker = folder / "prediction_source.json"
        if marker.is_file() and json.loads(marker.read_text()) == source:
            self.log(f"{trainer} fold {fold}: predicted, reusing {folder}")
            return False
        self.log(f"{trainer} fold {fold}: predicting {len(source['cases'])} cases")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.summary_file(trainer, fold).parent, ignore_errors=True)
        self.run(f"predict_{trainer}_fold_{fold}",
                 [_console_script("nnUNetv2_predict"), "-i", self.input_folder(fold), "-o", partial,
                  "-d", self.dataset_name, "-c", self.configuration, "-f", fold, "-tr", trainer, "-p", self.plans,
                  "-device", self.device, "-npp", self.num_processes, "-nps", self.num_processes]
                 + (["--disable_tta"] if self.disable_tta else []))
        _write_json_atomic(source, partial / "prediction_source.json")
        os.replace(partial, folder)
        return True

    def evaluate(self, trainer: str, fold: int) -> None:
        summary = self.summary_file(trainer, fold)
        if summary.is_file():
            self.log(f"{trainer} fold {fold}: evaluated, reusing {summary}")
            return
        self.log(f"{trainer} fold {fold}: evaluating")
        try:
            evaluate_folder(self.labels_folder, self.prediction_folder(trainer, fold),
                            self.preprocessed / "dataset.json", self.plans_file, summary,
                            num_processes=self.num_processes, chill=True, progress=False)
        except EvaluationError as error:
            raise ComparisonError(f"evaluating {trainer} fold {fold}: {error}") from error

    def cost(self) -> Optional[dict]:
        """The cost table of all trainers, measured in one run; reused while trainers and settings are the same."""
        if not self.measure_cost:
            return None
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_ext.evaluation.cost import measure_trainers
        plans = json.loads(self.plans_file.read_text())
        configuration = PlansManager(plans).get_configuration(self.configuration)
        num_classes = PlansManager(plans).get_label_manager(self.dataset_json).num_segmentation_heads
        settings = {"trainers": list(self.trainers), "plans": self.plans, "configuration": self.configuration,
                    "device": self.device, "batch": configuration.batch_size, "patch": configuration.patch_size,
                    "input_channels": len(self.dataset_json["channel_names"]), "num_classes": num_classes,
                    "repeats": self.cost_repeats}
        cost_file = self.output / "cost.json"
        if cost_file.is_file():
            cached = json.loads(cost_file.read_text())
            if cached["settings"] == settings:
                self.log(f"cost: measured, reusing {cost_file}")
                return cached
        self.log(f"cost: measuring {', '.join(settings['trainers'])} against nnUNetTrainer "
                 f"(patch {configuration.patch_size}, batch {configuration.batch_size}, {self.device})")
        results = measure_trainers(list(self.trainers), plans, self.configuration, settings["input_channels"],
                                   num_classes, configuration.batch_size, self.device, self.cost_repeats)
        cost = {"settings": settings, "results": results}
        _write_json_atomic(cost, cost_file)
        return cost

    def main(self) -> Path:
        """Every step that is not done yet, then the report; returns the report's path."""
        from nnunet_ext.evaluation.report import write_report
        self.output.mkdir(parents=True, exist_ok=True)
        self.log(f"comparing {', '.join(self.trainers)} on {self.dataset_name} {self.configuration} "
                 f"(plans {self.plans}, folds {', '.join(map(str, self.folds))}) into {self.output}")
        for trainer in self.trainers:
            for fold in self.folds:
                self.train(trainer, fold)
                self.predict(trainer, fold)
                self.evaluate(trainer, fold)
        cost = self.cost()
        settings = {k: v for k, v in asdict(self).items() if k not in ("env", "log", "output")}
        settings.update(dataset=self.dataset_name, cases="test (labelsTs)" if self.test_set else "validation")
        summaries = {trainer: {fold: str(self.summary_file(trainer, fold)) for fold in self.folds}
                     for trainer in self.trainers}
        return write_report(self.output, settings, summaries, cost)


def run_comparison(dataset, configuration: str, trainers: Sequence[str], folds: Sequence[int], output, **options
                   ) -> Path:
    """Compare ``trainers`` (see ``Comparison`` for ``options``, e.g. ``env=...``, ``device="cpu"``,
    ``disable_tta=True``); returns the path of ``report.md``. For ``nnunet_ext_demo``: reuses its trained folds."""
    return Comparison(str(dataset), configuration, list(trainers), [int(f) for f in folds], Path(output),
                      **options).main()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset id or name (DatasetXXX_Name)")
    parser.add_argument("configuration", help="e.g. 2d, 3d_fullres")
    parser.add_argument("-tr", nargs="+", required=True, dest="trainers", help="trainers to compare")
    parser.add_argument("-f", nargs="+", type=int, default=[0], dest="folds", help="folds (default 0)")
    parser.add_argument("-o", required=True, type=Path, dest="output", help="output folder of the comparison")
    parser.add_argument("-p", default="nnUNetPlans", dest="plans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-device", default="cuda" if _cuda() else "cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--disable_tta", action="store_true", help="predict without test-time mirroring")
    parser.add_argument("--test-set", action="store_true", help="predict imagesTs, score against labelsTs")
    parser.add_argument("--retrain", action="store_true", help="train again even where checkpoint_final.pth exists")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost measurement")
    parser.add_argument("--cost-repeats", type=int, default=3, help="timed repetitions per cost number")
    parser.add_argument("-np", type=int, default=1, dest="num_processes",
                        help="processes for prediction and evaluation (default 1)")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        report = run_comparison(args.dataset, args.configuration, args.trainers, args.folds, args.output,
                                plans=args.plans, device=args.device, disable_tta=args.disable_tta,
                                test_set=args.test_set, retrain=args.retrain, measure_cost=not args.no_cost,
                                cost_repeats=args.cost_repeats, num_processes=args.num_processes)
    except ComparisonError as error:
        sys.exit(f"error: {error}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
