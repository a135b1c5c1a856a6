"""SPA-DCN-Net: brightness robustness and training cost against nnU-Net's default 2D network, and the CPU choice of
the DCN backend.

    python -m benchmarks.spa_dcn_net                      # robustness table, then cost table (2 idle cores)
    python -m benchmarks.spa_dcn_net --part robustness --iterations 300   # longer training, same seeds
    python -m benchmarks.spa_dcn_net --write-readme       # both tables into README.md's Results section
    python -m benchmarks.spa_dcn_net --backends           # DCN backend timing only

Robustness (the paper's claim, Sec. I and IV: stable under brightness/gain changes). A synthetic ultrasound-like
2D task from the shared B-mode simulation (``nnunet_ext.synthetic.ultrasound_abdominal``: curvilinear fan, Rayleigh
speckle, tissue texture, depth attenuation partly undone by a TGC, log compression to 8 bit): segment a liver-like
organ (echogenicity 0.45 against 0.2) of random shape and position at 64x64. Training images get a random overall
gain in [0.7, 1.3] (the "varying gain"). Both networks are built by their trainers' ``build_network_architecture``
from the same nnU-Net 2D plan (``nnunet_ext.plans.presets``, 64x64 patch): ``nnUNetTrainer`` (nnU-Net's
PlainConvUNet) and ``nnUNetTrainerSPADCNNet``; both are trained with the same budget, seed, batches and recipe
(nnU-Net's Dice + CE on the full-resolution output, Adam 1e-3), and every image is z-scored per image as nnU-Net's
``ZScoreNormalization`` does. Each network trains in a process of its own with one thread, the two at the same time
(one core each on a 2-core machine), and prints its progress. 64x64 is the smallest size that SPA-DCN-Net's /32
encoder leaves a 2x2 bottleneck at. Test images (a fixed seed, disjoint from training) are evaluated unchanged and with
the displayed 8-bit brightness scaled x0.3, x0.5, x1.5 (rounded and clipped to 0..255, as a display gain does) and
with a depth-gain ramp (x1.5 at the top to x0.3 at the bottom: a mis-set TGC). Note that nnU-Net's per-image
z-scoring already cancels a pure global scaling except for quantisation and clipping, so the x0.3/x0.5/x1.5 rows
test mainly those; the ramp is not cancelled by any normalisation. Printed: Dice of the organ per condition for
both networks and the ratio SPA-DCN-Net / nnU-Net, and the final training loss of each.

Cost (the issue's target: training step <= 3x nnU-Net's 2D network at 256x256, batch 4). Both networks are built
from nnU-Net's 2D topology for 256x256 (``nnunet_ext.plans.presets``). Parameters, FLOPs, peak memory and inference
throughput come from ``nnunet_ext.evaluation.cost`` (a fresh process per network). The step time is measured in one
further process holding both networks, alternating one step of each per round (both under the same load), median
wall and CPU time over the rounds.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch

from benchmarks.readme_results import add_write_readme_argument, write_results
from nnunet_ext.plans.presets import configuration, make_plans
from nnunet_ext.synthetic.ultrasound_abdominal import bmode, echo_map, organ_polygon, random_fan, rasterise

SIZE = 64
TRAINERS = ("nnUNetTrainer", "nnUNetTrainerSPADCNNet")
COST_PATCH, COST_BATCH = (256, 256), 4
CONDITIONS = {"x1 (as trained)": 1.0, "x0.3": 0.3, "x0.5": 0.5, "x1.5": 1.5, "depth ramp 1.5 -> 0.3": "ramp"}
ORGAN_ECHO = 0.45


def make_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode image (uint8, before any gain) and its organ mask (0/1)."""
    shape = (SIZE, SIZE)
    fan = random_fan(rng, shape)
    polygon = organ_polygon(rng, (SIZE * rng.uniform(0.35, 0.65), SIZE * rng.uniform(0.35, 0.65)),
                            (SIZE * rng.uniform(0.15, 0.25), SIZE * rng.uniform(0.12, 0.2)))
    organ = (rasterise([(polygon, 1)], shape) == 1) & fan.mask(shape)
    image = bmode(rng, echo_map(shape, [(organ, ORGAN_ECHO)]), fan)
    return image, organ.astype(np.int64)


def apply_gain(image: np.ndarray, gain) -> np.ndarray:
    """Displayed brightness times ``gain`` (a number, or ``'ramp'``: 1.5 at the top row to 0.3 at the bottom)."""
    if gain == "ramp":
        gain = np.linspace(1.5, 0.3, image.shape[0])[:, None]
    return np.clip(np.round(image.astype(np.float64) * gain), 0, 255)


def zscore(image: np.ndarray) -> np.ndarray:
    return (image - image.mean()) / max(image.std(), 1e-8)


def dataset(seed: int, n: int, train_gain: bool) -> tuple[list, torch.Tensor]:
    """Raw images (for the test conditions) and labels; training images get a random gain in [0.7, 1.3]."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        image, label = make_case(rng)
        images.append(apply_gain(image, rng.uniform(0.7, 1.3)) if train_gain else image)
        labels.append(label)
    return images, torch.from_numpy(np.stack(labels))[:, None]


def as_batch(images: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([zscore(i) for i in images])[:, None]).float()


def build(trainer_name: str):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.training.spa_dcn_net import nnUNetTrainerSPADCNNet
    trainer = {"nnUNetTrainer": nnUNetTrainer, "nnUNetTrainerSPADCNNet": nnUNetTrainerSPADCNNet}[trainer_name]
    plans = PlansManager(make_plans({"2d": configuration(2, [SIZE, SIZE])}))
    return trainer.build_network_architecture(plans, plans.get_configuration("2d"), 1, 2, False)


def dice(prediction: torch.Tensor, label: torch.Tensor) -> float:
    """Dice of the organ over the whole test set."""
    p, g = prediction == 1, label == 1
    return float(2 * (p & g).sum() / max(int(p.sum() + g.sum()), 1))


def train_and_evaluate(trainer_name: str, iterations: int, batch: int, seed: int, n_train: int, n_test: int) -> dict:
    """Train one network (one thread; run in a process of its own) and return its Dice per test condition."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    network = build(trainer_name)
    train_images, train_labels = dataset(seed, n_train, train_gain=True)
    x_train = as_batch(train_images)
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    loss_fn.dc.apply_nonlin = softmax_helper_dim1
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    order = np.random.default_rng(seed + 1)
    network.train()
    start = time.perf_counter()
    losses = []
    for it in range(1, iterations + 1):
        idx = torch.from_numpy(order.choice(n_train, batch, replace=False))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x_train[idx]), train_labels[idx].float())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if it % max(iterations // 10, 1) == 0 or it == iterations:
            print(f"  {trainer_name}: iteration {it}/{iterations}, loss (mean of the last 10) "
                  f"{np.mean(losses[-10:]):.3f}, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    test_images, test_labels = dataset(seed + 1000, n_test, train_gain=False)
    network.eval()
    result = {"train_s": seconds, "final_loss": float(np.mean(losses[-10:]))}
    with torch.no_grad():
        for name, gain in CONDITIONS.items():
            logits = network(as_batch([apply_gain(i, gain) for i in test_images]))
            result[name] = dice(logits.argmax(1, keepdim=True), test_labels)
    return result


def robustness(iterations: int, batch: int, seed: int, n_train: int, n_test: int) -> str:
    """Both networks trained at the same time, each in a fresh process; returns the markdown table."""
    print(f"training {' and '.join(TRAINERS)} ({iterations} iterations x batch {batch}, one process and one thread "
          f"each); load average {os.getloadavg()[0]:.1f}", flush=True)
    with mp.get_context("spawn").Pool(len(TRAINERS), maxtasksperchild=1) as pool:
        pending = {name: pool.apply_async(train_and_evaluate, (name, iterations, batch, seed, n_train, n_test))
                   for name in TRAINERS}
        results = {name: job.get() for name, job in pending.items()}
    base, spa = (results[name] for name in TRAINERS)
    lines = [f"Brightness robustness: {n_train} training / {n_test} test images {SIZE}x{SIZE}, {iterations} iterations "
             f"x batch {batch}, Adam 1e-3, Dice + CE, seed {seed}; Dice of the organ over the test set",
             "", "| test condition | nnU-Net 2D | SPA-DCN-Net | ratio |", "|---|---|---|---|"]
    for name in CONDITIONS:
        lines.append(f"| {name} | {base[name]:.3f} | {spa[name]:.3f} | {spa[name] / max(base[name], 1e-8):.2f} |")
    lines.append(f"| final training loss (Dice + CE, mean of the last 10) | {base['final_loss']:.3f} | "
                 f"{spa['final_loss']:.3f} | |")
    lines.append(f"| training time (s, one thread each, concurrently) | {base['train_s']:.0f} | {spa['train_s']:.0f} | "
                 f"{spa['train_s'] / base['train_s']:.2f} |")
    return "\n".join(lines)


def cost_plans() -> tuple:
    return make_plans({"2d": configuration(2, list(COST_PATCH), COST_BATCH)}), "2d"


def interleaved_step_times(rounds: int) -> dict:
    """Median wall and CPU time of a training step of each network, one step of each per round (run in a fresh
    process: both networks live in it)."""
    from nnunet_ext.evaluation.cost import build_network
    from nnunet_ext.evaluation.measure import make_train_step, median_wall_and_cpu_time
    plans, name = cost_plans()
    x = torch.randn(COST_BATCH, 1, *COST_PATCH)
    steps = {trainer: make_train_step(build_network(trainer, plans, name, 1, 2), x) for trainer in TRAINERS}
    times = {trainer: ([], []) for trainer in TRAINERS}
    for trainer, step in steps.items():
        step()  # warm-up
    for r in range(rounds):
        for trainer, step in steps.items():
            wall, cpu = median_wall_and_cpu_time(step, repeats=1, warmup=0)
            times[trainer][0].append(wall)
            times[trainer][1].append(cpu)
        print(f"  step times, round {r + 1}/{rounds}: " + ", ".join(f"{t} {w[-1]:.2f} s" for t, (w, _) in
                                                                       times.items()), flush=True)
    return {trainer: (statistics.median(w), statistics.median(c)) for trainer, (w, c) in times.items()}


def cost(repeats: int) -> str:
    """The cost table at 256x256, batch 4 (markdown)."""
    from nnunet_ext.evaluation.cost import COST_ROWS, measure_trainers
    from nnunet_ext.evaluation.measure import run_in_fresh_process
    plans, name = cost_plans()
    print(f"cost at {COST_PATCH[0]}x{COST_PATCH[1]}, batch {COST_BATCH}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = measure_trainers([TRAINERS[1]], plans, name, 1, 2, COST_BATCH, "cpu", repeats)
    steps = run_in_fresh_process(interleaved_step_times, max(repeats, 3))
    base, spa = (results[t] for t in TRAINERS)
    widths = plans["configurations"][name]["architecture"]["arch_kwargs"]["features_per_stage"]
    lines = [f"Cost at {COST_PATCH[0]}x{COST_PATCH[1]}, batch {COST_BATCH}, 1 channel, 2 classes (nnU-Net's 2D "
             f"topology for that patch: {len(widths)} stages, widths {widths[0]}..{widths[-1]}), CPU, "
             f"{torch.get_num_threads()} threads; ratios from one run",
             "", "| | `nnUNetTrainer` | `nnUNetTrainerSPADCNNet` | ratio | target |", "|---|---|---|---|---|"]
    for (wall_label, index) in (("training step, wall (median of alternating steps, s)", 0),
                                ("training step, CPU time (s)", 1)):
        b, v = steps[TRAINERS[0]][index], steps[TRAINERS[1]][index]
        target = f"<= 3: {'met' if v / b <= 3 else 'missed'}" if index == 0 else ""
        lines.append(f"| {wall_label} | {b:.2f} | {v:.2f} | **{v / b:.2f}** | {target} |")
    for label, key, fmt in COST_ROWS:
        if base.get(key) is None or key == "step_s":
            continue
        lines.append(f"| {label} | {fmt(base[key])} | {fmt(spa[key])} | {spa[key] / base[key]:.2f} | |")
    return "\n".join(lines)


def backends(repeats: int = 3) -> None:
    """Training-step time of SPA-DCN-Net at 256x256, batch 4, with each DCN backend (this device)."""
    from nnunet_ext.evaluation.measure import make_train_step, median_wall_and_cpu_time
    from nnunet_ext.architectures.spa_dcn_net import SPADCNNet
    x = torch.randn(4, 1, 256, 256)
    print("| DCN backend | train step wall s | CPU s |")
    print("|---|---|---|")
    for backend in ("cpp", "generic", "torchvision"):
        torch.manual_seed(0)
        wall, cpu = median_wall_and_cpu_time(make_train_step(SPADCNNet(1, 2, deep_supervision=True,
                                                                       dcn_backend=backend), x), repeats=repeats)
        print(f"| {backend} | {wall:.2f} | {cpu:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "robustness", "cost"), default="all")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=64)
    parser.add_argument("--n_test", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the cost measurements")
    parser.add_argument("--backends", action="store_true", help="only time the DCN backends")
    add_write_readme_argument(parser)
    args = parser.parse_args()
    if args.backends:
        backends()
        return
    start = time.perf_counter()
    if args.part in ("all", "robustness"):
        table = robustness(args.iterations, args.batch, args.seed, args.n_train, args.n_test)
        print("\n" + table + "\n", flush=True)
        if args.write_readme:
            write_results("spa_dcn_net-robustness", table)
    if args.part in ("all", "cost"):
        table = cost(args.repeats)
        print("\n" + table + "\n", flush=True)
        if args.write_readme:
            write_results("spa_dcn_net-cost", table)
    print(f"total {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
