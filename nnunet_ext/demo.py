"""``nnunet_ext_demo``: the whole pipeline end to end on a small synthetic LiTS release.

Steps, each a real command run in its own process (its output goes to ``<workdir>/logs/``):

1. write a synthetic dataset in the real LiTS layout (``nnunet_ext.synthetic.lits``),
2. ``nnunet_ext_convert_lits`` into an nnU-Net raw dataset,
3. ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` (3d_fullres),
4. ``nnUNetv2_train`` fold 0 with the chosen trainer (a ``*_quick`` trainer trains a few iterations),
5. ``nnUNetv2_predict`` (new process, no test-time augmentation) on fold 0's validation cases
   and on the test volumes,
6. ``nnUNetv2_evaluate_folder`` on the validation predictions,
7. ``nnunet_ext_compare``'s comparison of the trained model against nnU-Net's network on the same plan (the papers'
   metrics, the cost table, a Markdown report with plots; ``--no-compare`` skips it),

then prints the Dice summary and where everything is. The demo sets ``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results`` and ``nnUNet_extTrainer`` for its own commands only,
inside the work folder, so it never touches a user's nnU-Net folders. Unless they are set already,
``nnUNet_def_n_proc`` and ``nnUNet_n_proc_DA`` are 1: on the tiny synthetic cases, nnU-Net's default
of 8 worker processes (each importing torch) costs far more than it saves.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from nnunet_ext.environment import trainers_folder
from nnunet_ext.synthetic.lits import make_synthetic_lits

DEFAULT_TRAINER = "nnUNetTrainerDPCNet_quick"
DEFAULT_DATASET_ID = 501
DATASET_NAME = "SyntheticLiTS"
CONFIGURATION = "3d_fullres"
FOLD = 0


class DemoStepError(RuntimeError):
    pass


class Demo:
    def __init__(self, workdir: Path, trainer: str, dataset_id: int, device: str, compare: bool = True):
        self.workdir = workdir.resolve()
        self.trainer = trainer
        self.dataset_id = dataset_id
        self.device = device
        self.compare = compare
        self.dataset = f"Dataset{dataset_id:03d}_{DATASET_NAME}"
        self.raw = self.workdir / "nnUNet_raw"
        self.preprocessed = self.workdir / "nnUNet_preprocessed"
        self.results = self.workdir / "nnUNet_results"
        self.logs = self.workdir / "logs"
        self.predictions = self.workdir / "predictions"
        self.env = {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", **os.environ,
                    "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                    "nnUNet_results": str(self.results), "nnUNet_extTrainer": str(trainers_folder())}
        self.step_count = 0

    @property
    def model_folder(self) -> Path:
        return self.results / self.dataset / f"{self.trainer}__nnUNetPlans__{CONFIGURATION}"

    def run(self, name: str, command: list) -> None:
        """Run one command, its output into ``logs/NN_name.log``; stop with the log's tail on failure."""
        self.step_count += 1
        log = self.logs / f"{self.step_count:02d}_{name}.log"
        print(f"[{self.step_count}] {' '.join(map(str, command))}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as handle:
            result = subprocess.run([str(c) for c in command], env=self.env, stdout=handle,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        print(f"    done in {time.perf_counter() - start:.0f} s (log: {log})", flush=True)
        if result.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
            raise DemoStepError(f"step '{name}' failed with exit code {result.returncode}; "
                                f"last lines of {log}:\n{tail}")

    def validation_cases(self) -> list:
        splits = json.loads((self.preprocessed / self.dataset / "splits_final.json").read_text())
        return sorted(splits[FOLD]["val"])

    def link_validation_images(self) -> Path:
        """Fold 0's validation images in a folder of their own, as ``nnUNetv2_predict -i`` wants."""
        folder = self.workdir / "validation_images"
        folder.mkdir()
        for case in self.validation_cases():
            image = f"{case}_0000.nii.gz"
            (folder / image).symlink_to(self.raw / self.dataset / "imagesTr" / image)
        return folder

    def predict(self, input_folder: Path, output_folder: Path) -> None:
        self.run(f"predict_{output_folder.name}", [
            "nnUNetv2_predict", "-i", input_folder, "-o", output_folder, "-d", self.dataset_id,
            "-c", CONFIGURATION, "-f", FOLD, "-tr", self.trainer, "-device", self.device,
            "--disable_tta", "-npp", 1, "-nps", 1])

    def main(self) -> dict:
        start = time.perf_counter()
        self.logs.mkdir(parents=True)
        print(f"[0] synthetic LiTS release -> {self.workdir / 'LiTS'}", flush=True)
        make_synthetic_lits(self.workdir / "LiTS")
        self.run("convert", ["nnunet_ext_convert_lits", self.workdir / "LiTS", "-d", self.dataset_id,
                             "-n", DATASET_NAME, "-o", self.raw])
        self.run("plan_and_preprocess", ["nnUNetv2_plan_and_preprocess", "-d", self.dataset_id,
                                         "-c", CONFIGURATION, "-np", 1, "-npfp", 1,
                                         "--verify_dataset_integrity"])
        self.run("train", ["nnUNetv2_train", self.dataset_id, CONFIGURATION, FOLD, "-tr", self.trainer,
                           "-device", self.device])
        validation_predictions = self.predictions / "validation"
        self.predict(self.link_validation_images(), validation_predictions)
        self.predict(self.raw / self.dataset / "imagesTs", self.predictions / "test")
        summary_file = validation_predictions / "summary.json"
        self.run("evaluate", ["nnUNetv2_evaluate_folder", self.raw / self.dataset / "labelsTr",
                              validation_predictions, "-djfile", self.model_folder / "dataset.json",
                              "-pfile", self.model_folder / "plans.json", "-o", summary_file, "-np", 1,
                              "--chill"])
        summary = json.loads(summary_file.read_text())
        report = self.comparison_report() if self.compare else None
        self.report(summary, summary_file, time.perf_counter() - start, report)
        return summary

    def comparison_report(self) -> Path:
        """The papers' metrics and the cost of the trained model next to nnU-Net's network (``nnunet_ext_compare``;
        it reuses the trained fold)."""
        from nnunet_ext.evaluation.compare import run_comparison
        print(f"[{self.step_count + 1}] comparison with nnU-Net's network -> {self.workdir / 'comparison'}", flush=True)
        start = time.perf_counter()
        report = run_comparison(self.dataset_id, CONFIGURATION, [self.trainer], [FOLD], self.workdir / "comparison",
                                env=self.env, device=self.device, disable_tta=True, cost_repeats=1,
                                log=lambda message: None)
        print(f"    done in {time.perf_counter() - start:.0f} s", flush=True)
        return report

    def report(self, summary: dict, summary_file: Path, seconds: float, comparison: Optional[Path]) -> None:
        dice = {label: round(metrics["Dice"], 4) for label, metrics in summary["mean"].items()}
        print(f"\nDemo finished in {seconds:.0f} s with trainer {self.trainer} "
              f"({len(self.validation_cases())} validation cases, fold {FOLD}).")
        print(f"Dice per label (1 liver, 2 tumour): {dice}; mean foreground Dice: "
              f"{summary['foreground_mean']['Dice']:.4f}")
        print(f"Evaluation summary:     {summary_file}")
        print(f"Trained model:          {self.model_folder / f'fold_{FOLD}'}")
        print(f"Validation predictions: {self.predictions / 'validation'}")
        print(f"Test predictions:       {self.predictions / 'test'}")
        if comparison is not None:
            print(f"Comparison report:      {comparison}")
        print(f"Step logs:              {self.logs}")
        print("Use this model from a shell with:")
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
            print(f'  export {name}="{self.env[name]}"')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("nnunet_ext_demo"),
                        help="folder for everything the demo writes (default: ./nnunet_ext_demo)")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER, help=f"default: {DEFAULT_TRAINER}")
    parser.add_argument("--dataset-id", type=int, default=DEFAULT_DATASET_ID, help=f"default: {DEFAULT_DATASET_ID}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing work folder first")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the final comparison with nnU-Net's network (metrics, cost, report)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.workdir.exists() and any(args.workdir.iterdir()):
        if not args.overwrite:
            sys.exit(f"error: {args.workdir} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(args.workdir)
    try:
        Demo(args.workdir, args.trainer, args.dataset_id, args.device, args.compare).main()
    except DemoStepError as error:
        sys.exit(f"error: {error}")
