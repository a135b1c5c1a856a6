"""``nnunet_ext_demo``: the whole pipeline end to end on a small synthetic LiTS release, training long enough to learn.

Steps, each a real command run in its own process (its output goes to ``<workdir>/logs/``):

1. write a synthetic dataset in the real LiTS layout (``nnunet_ext.synthetic.lits``, ``--seed``),
2. convert it with the package's LiTS converter into an nnU-Net raw dataset,
3. ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` (3d_fullres),
4. ``nnUNetv2_train`` fold 0 with the chosen trainer, its progress echoed to the console (by default
   ``nnUNetTrainerDPCNet_demo``: the demo schedule, long enough to segment the liver; ``--quick`` trains the
   ``_quick`` variant instead, a few iterations that only show the pipeline runs),
5. ``nnUNetv2_predict`` (new process, no test-time augmentation) on fold 0's validation cases and on the test volumes,
6. ``nnUNetv2_evaluate_folder`` on the validation predictions,
7. ``nnunet_ext_compare``'s comparison of the trained model against nnU-Net's network on the same plan (the papers'
   metrics, the cost table, a Markdown report with plots; ``--no-compare`` skips it),

then prints the Dice summary, the wall and CPU time of every step and where everything is. Every command is run by
this interpreter (``python -m`` or the console scripts installed beside it), so the demo works from a virtual
environment that is not activated. The trainer name is checked before any work starts. The demo sets ``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results`` and ``nnUNet_extTrainer`` for its own commands only, inside the work
folder, so it never touches a user's nnU-Net folders. Unless they are set already, ``nnUNet_def_n_proc`` and
``nnUNet_n_proc_DA`` are 1: on the tiny synthetic cases, nnU-Net's default of 8 worker processes (each importing
torch) costs far more than it saves.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Optional, Tuple

from nnunet_ext.training.trainer_names import TRAINER_NAMES, unknown_trainer_message

DEFAULT_TRAINER = "nnUNetTrainerDPCNet_demo"
SCHEDULE_SUFFIXES = ("_demo", "_quick")
DEFAULT_DATASET_ID = 501
DATASET_NAME = "SyntheticLiTS"
CONFIGURATION = "3d_fullres"
FOLD = 0
TRAINING_ECHO = re.compile(r"^epoch \d+/\d+: |Pseudo dice|Epoch time|Mean Validation Dice")
"""Lines of the training log echoed to the console: the trainer's progress lines and nnU-Net's epoch summary."""


class DemoStepError(RuntimeError):
    pass


def quick_variant(trainer: str) -> str:
    """The ``_quick`` variant of ``trainer`` (``nnUNetTrainerDPCNet_demo`` -> ``nnUNetTrainerDPCNet_quick``)."""
    for suffix in SCHEDULE_SUFFIXES:
        if trainer.endswith(suffix):
            trainer = trainer[:-len(suffix)]
    return f"{trainer}_quick"


def choose_trainer(trainer: str, quick: bool) -> str:
    """The registered trainer the demo trains; ValueError naming the problem and the close matches otherwise."""
    if trainer not in TRAINER_NAMES:
        raise ValueError(unknown_trainer_message(trainer))
    if not quick:
        return trainer
    variant = quick_variant(trainer)
    if variant not in TRAINER_NAMES:
        quick_names = [name for name in TRAINER_NAMES if name.endswith("_quick")]
        raise ValueError(f"--quick: {trainer} has no registered _quick variant ({variant}); "
                         f"pass one of {', '.join(quick_names)} or drop --quick")
    return variant


def console_script(name: str) -> str:
    """The console script ``name`` installed beside this interpreter (a virtual environment need not be activated);
    the name itself (looked up on ``PATH``) where there is none."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def children_cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished child processes, in seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Demo:
    def __init__(self, workdir: Path, trainer: str, dataset_id: int, device: str, compare: bool = True,
                 seed: int = 0):
        self.workdir = workdir.resolve()
        self.trainer = trainer
        self.dataset_id = dataset_id
        self.device = device
        self.compare = compare
        self.seed = seed
        self.dataset = f"Dataset{dataset_id:03d}_{DATASET_NAME}"
        self.raw = self.workdir / "nnUNet_raw"
        self.preprocessed = self.workdir / "nnUNet_preprocessed"
        self.results = self.workdir / "nnUNet_results"
        self.logs = self.workdir / "logs"
        self.predictions = self.workdir / "predictions"
        from nnunet_ext.environment import trainers_folder
        self.env = {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", **os.environ, "PYTHONUNBUFFERED": "1",
                    "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                    "nnUNet_results": str(self.results), "nnUNet_extTrainer": str(trainers_folder())}
        self.timings: List[Tuple[str, float, float]] = []  # (step, wall s, CPU s)

    @property
    def model_folder(self) -> Path:
        return self.results / self.dataset / f"{self.trainer}__nnUNetPlans__{CONFIGURATION}"

    def timed(self, name: str, label: str, action) -> None:
        """Run ``action()`` as step ``name``, printing ``label`` first and its wall and CPU time after."""
        print(f"[{len(self.timings) + 1}] {label}", flush=True)
        wall, cpu = time.perf_counter(), children_cpu_seconds()
        action()
        wall, cpu = time.perf_counter() - wall, children_cpu_seconds() - cpu
        self.timings.append((name, wall, cpu))
        print(f"    done in {wall:.0f} s (CPU {cpu:.0f} s)", flush=True)

    def run(self, name: str, command: list, echo: Optional[re.Pattern] = None) -> None:
        """Run one command, its output into ``logs/NN_name.log`` (lines matching ``echo`` also to the console);
        stop with the log's tail on failure."""
        log = self.logs / f"{len(self.timings) + 1:02d}_{name}.log"
        shown = [Path(str(command[0])).name] + [str(c) for c in command[1:]]

        def execute():
            with open(log, "w") as handle, subprocess.Popen(
                    [str(c) for c in command], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, text=True) as process:
                for line in process.stdout:
                    handle.write(line)
                    if echo is not None and echo.search(line):
                        print(f"    {line.rstrip()}", flush=True)
            if process.returncode != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
                raise DemoStepError(f"step '{name}' failed with exit code {process.returncode}; "
                                    f"last lines of {log}:\n{tail}")
        self.timed(name, f"{' '.join(shown)}  (log: {log})", execute)

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
            console_script("nnUNetv2_predict"), "-i", input_folder, "-o", output_folder, "-d", self.dataset_id,
            "-c", CONFIGURATION, "-f", FOLD, "-tr", self.trainer, "-device", self.device,
            "--disable_tta", "-npp", 1, "-nps", 1])

    def main(self) -> dict:
        from nnunet_ext.synthetic.lits import make_synthetic_lits
        start = time.perf_counter()
        self.logs.mkdir(parents=True)
        self.timed("synthetic", f"synthetic LiTS release (seed {self.seed}) -> {self.workdir / 'LiTS'}",
                   lambda: make_synthetic_lits(self.workdir / "LiTS", seed=self.seed))
        self.run("convert", [sys.executable, "-m", "nnunet_ext.dataset_conversion.lits", self.workdir / "LiTS",
                             "-d", self.dataset_id, "-n", DATASET_NAME, "-o", self.raw])
        self.run("plan_and_preprocess", [console_script("nnUNetv2_plan_and_preprocess"), "-d", self.dataset_id,
                                         "-c", CONFIGURATION, "-np", 1, "-npfp", 1, "--verify_dataset_integrity"])
        self.run("train", [console_script("nnUNetv2_train"), self.dataset_id, CONFIGURATION, FOLD,
                           "-tr", self.trainer, "-device", self.device], echo=TRAINING_ECHO)
        validation_predictions = self.predictions / "validation"
        self.predict(self.link_validation_images(), validation_predictions)
        self.predict(self.raw / self.dataset / "imagesTs", self.predictions / "test")
        summary_file = validation_predictions / "summary.json"
        self.run("evaluate", [console_script("nnUNetv2_evaluate_folder"), self.raw / self.dataset / "labelsTr",
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
        reports = []
        self.timed("compare", f"comparison with nnU-Net's network -> {self.workdir / 'comparison'}",
                   lambda: reports.append(run_comparison(
                       self.dataset_id, CONFIGURATION, [self.trainer], [FOLD], self.workdir / "comparison",
                       env=self.env, device=self.device, disable_tta=True, cost_repeats=1, log=lambda message: None)))
        return reports[0]

    def report(self, summary: dict, summary_file: Path, seconds: float, comparison: Optional[Path]) -> None:
        dice = {label: round(metrics["Dice"], 4) for label, metrics in summary["mean"].items()}
        cpu = sum(step_cpu for _, _, step_cpu in self.timings)
        print(f"\nDemo finished in {seconds:.0f} s (CPU {cpu:.0f} s) with trainer {self.trainer}, data seed "
              f"{self.seed} ({len(self.validation_cases())} validation cases, fold {FOLD}).")
        print("Time per step (wall, CPU): " + ", ".join(f"{name} {wall:.0f} s / {step_cpu:.0f} s"
                                                       for name, wall, step_cpu in self.timings))
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


def trainer_listing() -> str:
    """``--help``'s list of every registered trainer."""
    return "registered trainers (--trainer):\n" + textwrap.fill(
        ", ".join(TRAINER_NAMES), width=118, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnunet_ext_demo", description=__doc__, epilog=trainer_listing(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("nnunet_ext_demo"),
                        help="folder for everything the demo writes (default: ./nnunet_ext_demo)")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER,
                        help=f"any registered trainer, listed below (default: {DEFAULT_TRAINER})")
    parser.add_argument("--quick", action="store_true",
                        help="train the trainer's _quick variant (2 epochs x 5 iterations; default "
                             f"{quick_variant(DEFAULT_TRAINER)}): shows that the pipeline runs, learns nothing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset (default: 0)")
    parser.add_argument("--dataset-id", type=int, default=DEFAULT_DATASET_ID, help=f"default: {DEFAULT_DATASET_ID}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if PyTorch finds a GPU, else cpu")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing work folder first")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the final comparison with nnU-Net's network (metrics, cost, report)")
    args = parser.parse_args(argv)
    try:
        args.trainer = choose_trainer(args.trainer, args.quick)
    except ValueError as error:
        parser.error(str(error))
    return args


def default_device() -> str:
    import torch  # here, not at the top: the name check and --help must not wait seconds for torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.workdir.exists() and any(args.workdir.iterdir()):
        if not args.overwrite:
            sys.exit(f"error: {args.workdir} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(args.workdir)
    if not args.trainer.endswith(SCHEDULE_SUFFIXES):
        print(f"note: {args.trainer} trains nnU-Net's full schedule (1000 epochs x 250 iterations): days on a CPU; "
              f"its _demo or _quick variant, where registered, is the demo-sized one", flush=True)
    try:
        Demo(args.workdir, args.trainer, args.dataset_id, args.device or default_device(), args.compare,
             args.seed).main()
    except DemoStepError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
