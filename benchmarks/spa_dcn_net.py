"""SPA-DCN-Net: brightness robustness against nnU-Net's default 2D network, and the CPU choice of the DCN backend.

    python -m benchmarks.spa_dcn_net                      # robustness table (about 10 minutes on 2 idle cores)
    python -m benchmarks.spa_dcn_net --iterations 600     # longer training, same seeds
    python -m benchmarks.spa_dcn_net --backends           # DCN backend timing only

Robustness (the paper's claim, Sec. I and IV: stable under brightness/gain changes). A synthetic ultrasound-like
2D task from the shared B-mode simulation (``nnunet_ext.synthetic.ultrasound_abdominal``: curvilinear fan, Rayleigh
speckle, tissue texture, depth attenuation partly undone by a TGC, log compression to 8 bit): segment a liver-like
organ (echogenicity 0.45 against 0.2) of random shape and position at 64x64. Training images get a random overall
gain in [0.7, 1.3] (the "varying gain"). Both networks are built by their trainers' ``build_network_architecture``
from the same nnU-Net 2D plan (``nnunet_ext.plans.presets``, 64x64 patch): ``nnUNetTrainer`` (nnU-Net's
PlainConvUNet) and ``nnUNetTrainerSPADCNNet``; both are trained with the same budget, seed, batches and recipe
(nnU-Net's Dice + CE on the full-resolution output, Adam 1e-3), and every image is z-scored per image as nnU-Net's
``ZScoreNormalization`` does. Test images (a fixed seed, disjoint from training) are evaluated unchanged and with
the displayed 8-bit brightness scaled x0.3, x0.5, x1.5 (rounded and clipped to 0..255, as a display gain does) and
with a depth-gain ramp (x1.5 at the top to x0.3 at the bottom: a mis-set TGC). Note that nnU-Net's per-image
z-scoring already cancels a pure global scaling except for quantisation and clipping, so the x0.3/x0.5/x1.5 rows
test mainly those; the ramp is not cancelled by any normalisation. Printed: Dice of the organ per condition for
both networks and the ratio SPA-DCN-Net / nnU-Net.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nnunet_ext.plans.presets import configuration, make_plans
from nnunet_ext.synthetic.ultrasound_abdominal import bmode, echo_map, organ_polygon, random_fan, rasterise

SIZE = 64
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
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1
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
    for _ in range(iterations):
        idx = torch.from_numpy(order.choice(n_train, batch, replace=False))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x_train[idx]), train_labels[idx].float())
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    test_images, test_labels = dataset(seed + 1000, n_test, train_gain=False)
    network.eval()
    result = {"train_s": seconds, "final_loss": loss.item()}
    with torch.no_grad():
        for name, gain in CONDITIONS.items():
            logits = network(as_batch([apply_gain(i, gain) for i in test_images]))
            result[name] = dice(logits.argmax(1, keepdim=True), test_labels)
    return result


def robustness(iterations: int, batch: int, seed: int, n_train: int, n_test: int) -> None:
    results = {name: train_and_evaluate(name, iterations, batch, seed, n_train, n_test)
               for name in ("nnUNetTrainer", "nnUNetTrainerSPADCNNet")}
    base, spa = results["nnUNetTrainer"], results["nnUNetTrainerSPADCNNet"]
    print(f"\nBrightness robustness: {n_train} training / {n_test} test images {SIZE}x{SIZE}, {iterations} iterations "
          f"x batch {batch}, Adam 1e-3, Dice + CE, seed {seed}")
    print("| test condition | nnU-Net 2D Dice | SPA-DCN-Net Dice | ratio |")
    print("|---|---|---|---|")
    for name in CONDITIONS:
        print(f"| {name} | {base[name]:.3f} | {spa[name]:.3f} | {spa[name] / max(base[name], 1e-8):.2f} |")
    print(f"| training time (s) | {base['train_s']:.0f} | {spa['train_s']:.0f} | "
          f"{spa['train_s'] / base['train_s']:.2f} |")


def backends(repeats: int = 3) -> None:
    """Training-step time of SPA-DCN-Net at 256x256, batch 4, with each DCN backend (this device)."""
    from nnunet_ext.evaluation.measure import make_train_step, median_wall_and_cpu_time
    from nnunet_ext.architectures.spa_dcn_net import SPADCNNet
    x = torch.randn(4, 1, 256, 256)
    print("| DCN backend | train step wall s | CPU s |")
    print("|---|---|---|")
    for backend in ("generic", "torchvision"):
        torch.manual_seed(0)
        wall, cpu = median_wall_and_cpu_time(make_train_step(SPADCNNet(1, 2, deep_supervision=True,
                                                                       dcn_backend=backend), x), repeats=repeats)
        print(f"| {backend} | {wall:.2f} | {cpu:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=64)
    parser.add_argument("--n_test", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids oversubscription on a shared machine)")
    parser.add_argument("--backends", action="store_true", help="only time the DCN backends")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backends:
        backends()
    else:
        robustness(args.iterations, args.batch, args.seed, args.n_train, args.n_test)


if __name__ == "__main__":
    main()
