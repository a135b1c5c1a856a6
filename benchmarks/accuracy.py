"""Accuracy of a method against nnU-Net's ``nnUNetTrainer`` on a synthetic twin, through nnU-Net's own commands.

    python -m benchmarks.accuracy dpcnet|godc_lfam|scrnet|dlkunet [--epochs E] [--iterations I] [--seed S]
                                  [--workdir DIR] [--write-readme]

For the method's task (``TASKS``: the synthetic twin of the paper's dataset):

1. the twin (``nnunet_ext.synthetic``) is written, converted by the package's converter and planned with
   ``nnUNetv2_plan_and_preprocess -c <configuration> --verify_dataset_integrity`` (once per work folder; the
   methods on the same task share it),
2. ``nnUNetv2_train <id> <configuration> 0 -tr <trainer> -device cpu`` for nnU-Net's trainer and the method's, with
   the same budget and seed: both names are budget variants (``benchmarks/trainers/nnunet_ext_budget_trainers.py``:
   ``E`` epochs x ``I`` iterations, no mirroring, generators seeded with ``S``); the training log's epoch lines are
   echoed as progress, and a trained fold is reused (the baseline of a task is trained once for the methods of
   the same budget),
3. ``nnunet_ext.evaluation.compare.run_comparison``: ``nnUNetv2_predict --disable_tta`` of fold 0's validation
   cases and the evaluation (``nnunet_ext_evaluate``: nnU-Net's Dice per label),

and prints the Dice of every label for both trainers with the ratio method / nnU-Net; ``--write-readme`` writes that
table into the README block ``<method>-accuracy`` (it states the budget that ran). The default budget of every method
is the demo's schedule (``DEMO_SCHEDULE``, 6 epochs x 12 iterations), in which DPC-Net and nnU-Net's network learn the
synthetic LiTS liver (Dice >= 0.8, measured by the demo) in minutes on 2 idle CPU cores; on a loaded machine
``--parallel`` trains both trainers at once (each reports its own CPU time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Tuple

from benchmarks.readme_results import add_write_readme_argument, write_results
from benchmarks.trainers.nnunet_ext_budget_trainers import budget_trainer_name
from nnunet_ext.dataset_conversion import busi, synapse
from nnunet_ext.environment import trainers_folder
from nnunet_ext.evaluation.compare import _console_script, run_comparison
from nnunet_ext.training.base import DEMO_SCHEDULE

BUDGET_TRAINERS = Path(__file__).resolve().parent / "trainers"
BASELINE = "nnUNetTrainer"
FOLD = 0
PROGRESS_MARKERS = ("Epoch ", "train_loss", "Pseudo dice", "Epoch time", " iterations, loss ")


def _synthetic(name: str) -> Callable[[Path], dict]:
    from nnunet_ext.synthetic.cli import GENERATORS
    return GENERATORS[name]


@dataclass(frozen=True)
class Task:
    """A synthetic twin as the package converts and plans it."""
    twin: str  # nnunet_ext.synthetic.cli.GENERATORS key
    dataset_id: int
    dataset_name: str
    converter: str  # module run with ``python -m``
    configuration: str
    input_subfolder: str = ""
    converter_args: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"


TASKS: Dict[str, Task] = {
    "lits": Task("lits", 701, "SyntheticLiTS", "nnunet_ext.dataset_conversion.lits", "3d_fullres"),
    "busi": Task("busi", 702, "SyntheticBUSI", "nnunet_ext.dataset_conversion.busi", "2d",
                 input_subfolder=busi.ROOT_FOLDER),
    "synapse": Task("synapse", 703, "SyntheticSynapse", "nnunet_ext.dataset_conversion.synapse", "2d",
                    input_subfolder=synapse.RAW_DATA),
}


@dataclass(frozen=True)
class Method:
    """A method's trainer on its task, the README block its table goes to, and its default budget."""
    title: str
    task: str
    trainer: str
    readme_key: str
    epochs: int = DEMO_SCHEDULE.epochs
    iterations: int = DEMO_SCHEDULE.iterations


METHODS: Dict[str, Method] = {
    "dpcnet": Method("DPC-Net", "lits", "nnUNetTrainerDPCNet", "dpcnet-accuracy"),
    "godc_lfam": Method("LFAM + GODC", "lits", "nnUNetTrainerLFAMGODC", "godc_lfam-accuracy"),
    "scrnet": Method("SCRNet", "busi", "nnUNetTrainerSCRNet", "scrnet-accuracy"),
    "dlkunet": Method("DLKUNet-S", "synapse", "nnUNetTrainerDLKUNetS", "dlkunet-accuracy"),
}


class BenchmarkError(RuntimeError):
    """A step failed; the message names it and the tail of its log."""


class AccuracyBenchmark:
    def __init__(self, method: Method, workdir: Path, epochs: int, iterations: int, seed: int):
        self.method, self.task = method, TASKS[method.task]
        self.epochs, self.iterations, self.seed = epochs, iterations, seed
        self.workdir = workdir.resolve() / self.task.twin
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1",
                    "nnUNet_raw": str(self.workdir / "nnUNet_raw"),
                    "nnUNet_preprocessed": str(self.workdir / "nnUNet_preprocessed"),
                    "nnUNet_results": str(self.workdir / "nnUNet_results"),
                    "nnUNet_extTrainer": os.pathsep.join([str(trainers_folder()), str(BUDGET_TRAINERS)])}
        self.trainers = [budget_trainer_name(name, epochs, iterations, seed) for name in (BASELINE, method.trainer)]
        self.seconds: Dict[str, Tuple[float, float]] = {}  # trainer -> training wall, CPU seconds

    @property
    def preprocessed(self) -> Path:
        return self.workdir / "nnUNet_preprocessed" / self.task.dataset

    def run(self, name: str, command: list, progress: bool = False, **env) -> Tuple[float, float]:
        """One command in a new process (``self.env`` updated by ``env``), its output into ``logs/<name>.log``
        (epoch lines echoed with ``progress``); returns its wall and CPU seconds, raises BenchmarkError with the
        log's tail on failure."""
        log_file = self.workdir / "logs" / f"{name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        print(f"$ {' '.join(map(str, command))}", flush=True)
        start = time.perf_counter()
        with open(log_file, "w") as log, subprocess.Popen([str(c) for c in command], env={**self.env, **env}, text=True,
                                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          stdin=subprocess.DEVNULL) as process:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if progress and any(marker in line for marker in PROGRESS_MARKERS):
                    print(f"    [{name}] {line.rstrip()}", flush=True)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time, also when others run beside it
            process.returncode = os.waitstatus_to_exitcode(status)
        seconds, cpu_seconds = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
        print(f"    {name}: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU, log {log_file}", flush=True)
        if process.returncode != 0:
            tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
            raise BenchmarkError(f"{name} failed (exit code {process.returncode}):\n{tail}")
        return seconds, cpu_seconds

    def prepare(self) -> None:
        """Write, convert and plan the twin unless its plans exist."""
        done = self.workdir / "prepared.json"
        if done.is_file():
            print(f"{self.task.dataset}: planned, reusing {self.preprocessed}", flush=True)
            return
        release = self.workdir / "release"
        print(f"synthetic {self.task.twin} -> {release}", flush=True)
        _synthetic(self.task.twin)(release, overwrite=True)
        self.run("convert", [sys.executable, "-m", self.task.converter, release / self.task.input_subfolder,
                             "-d", self.task.dataset_id, "-n", self.task.dataset_name, "--overwrite",
                             *self.task.converter_args])
        self.run("plan_and_preprocess", [_console_script("nnUNetv2_plan_and_preprocess"), "-d", self.task.dataset_id,
                                         "-c", self.task.configuration, "-np", 1, "-npfp", 1,
                                         "--verify_dataset_integrity"])
        done.write_text(json.dumps({"dataset": self.task.dataset, "configuration": self.task.configuration}))

    def train(self, trainer: str) -> None:
        fold = self.workdir / "nnUNet_results" / self.task.dataset / \
            f"{trainer}__nnUNetPlans__{self.task.configuration}" / f"fold_{FOLD}"
        timing = fold / "benchmark_training_seconds.json"
        if (fold / "checkpoint_final.pth").is_file() and timing.is_file():
            self.seconds[trainer] = tuple(json.loads(timing.read_text())["seconds"])
            print(f"{trainer}: trained, reusing {fold}", flush=True)
            return
        seconds = self.run(f"train_{trainer}", [
            _console_script("nnUNetv2_train"), self.task.dataset_id, self.task.configuration, FOLD, "-tr", trainer,
            "-device", "cpu"], progress=True, nnUNet_n_proc_DA="0")  # augmentation in the seeded process
        timing.write_text(json.dumps({"seconds": seconds}))
        self.seconds[trainer] = seconds

    def main(self, parallel: bool = False) -> str:
        self.prepare()
        self.parallel = parallel
        if parallel:  # both trainings at once, each in its own process (own CPU time); wall times then overlap
            with ThreadPoolExecutor(len(self.trainers)) as pool:
                list(pool.map(self.train, self.trainers))
        else:
            for trainer in self.trainers:
                self.train(trainer)
        report = run_comparison(self.task.dataset_id, self.task.configuration, self.trainers, [FOLD],
                                self.workdir / f"comparison_{self.method.readme_key}", env=self.env, device="cpu",
                                disable_tta=True, measure_cost=False)
        return self.table(report.parent)

    def table(self, comparison: Path) -> str:
        """Markdown: the setting, then per label the Dice of both trainers and the ratio."""
        dataset_json = json.loads((self.preprocessed / "dataset.json").read_text())
        plans = json.loads((self.preprocessed / "nnUNetPlans.json").read_text())
        configuration = plans["configurations"][self.task.configuration]
        splits = json.loads((self.preprocessed / "splits_final.json").read_text())[FOLD]
        summaries = [json.loads((comparison / "evaluation" / t / f"fold_{FOLD}" / "summary.json").read_text())
                     for t in self.trainers]
        names = {str(value): name for name, value in dataset_json["labels"].items() if name != "background"}
        lines = [
            f"{self.method.title} (`{self.method.trainer}`) against nnU-Net (`{BASELINE}`) on the synthetic "
            f"{self.task.twin} twin ({self.task.configuration}, patch {configuration['patch_size']}, batch "
            f"{configuration['batch_size']}; fold {FOLD}: {len(splits['train'])} training, {len(splits['val'])} "
            f"validation cases). Budget for both: {self.epochs} epochs x {self.iterations} iterations, seed "
            f"{self.seed}, no mirroring{', both trained at the same time' if self.parallel else ''}; "
            f"`nnUNetv2_predict --disable_tta` on the validation cases. Dice (mean over the validation cases):",
            "",
            f"| label | nnU-Net | {self.method.title} | ratio |",
            "|---|---|---|---|",
        ]
        for label, name in names.items():
            base, ours = (s["mean"][label]["Dice"] for s in summaries)
            ratio = f"{ours / base:.2f}" if base > 0 else "-"
            lines.append(f"| {label} {name} | {base:.3f} | {ours:.3f} | {ratio} |")
        base, ours = (s["foreground_mean"]["Dice"] for s in summaries)
        lines.append(f"| foreground mean | {base:.3f} | {ours:.3f} | {ours / base:.2f} |" if base > 0 else
                     f"| foreground mean | {base:.3f} | {ours:.3f} | - |")
        for kind, index in (("wall", 0), ("CPU", 1)):
            base_s, ours_s = (self.seconds[t][index] for t in self.trainers)
            lines.append(f"| training {kind} time (`nnUNetv2_train`) | {base_s:.0f} s | {ours_s:.0f} s | "
                         f"{ours_s / base_s:.2f} |")
        return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--epochs", type=int, help="epochs (default: the method's budget in METHODS)")
    parser.add_argument("--iterations", type=int, help="iterations per epoch (default: the method's budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nnunet_ext_accuracy"),
                        help="twins, nnU-Net folders, logs; reused between runs (default /tmp/nnunet_ext_accuracy)")
    parser.add_argument("--parallel", action="store_true",
                        help="train nnU-Net's and the method's trainer at the same time (on a loaded machine)")
    add_write_readme_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    method = METHODS[args.method]
    epochs = method.epochs if args.epochs is None else args.epochs
    iterations = method.iterations if args.iterations is None else args.iterations
    if epochs < 1 or iterations < 1:
        sys.exit(f"error: --epochs and --iterations must be at least 1, got {epochs} and {iterations}")
    start = time.perf_counter()
    try:
        table = AccuracyBenchmark(method, args.workdir, epochs, iterations, args.seed).main(args.parallel)
    except BenchmarkError as error:
        sys.exit(f"error: {error}")
    print(f"\n{table}\n\n({time.perf_counter() - start:.0f} s in all; load {os.getloadavg()[0]:.1f})")
    if args.write_readme:
        write_results(method.readme_key, table)


if __name__ == "__main__":
    main()
