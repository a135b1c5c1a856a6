"""Convergence benchmark: plain per-sample soft Dice vs GODC (Ming & Xiao 2024) on a synthetic 2D task.

The paper claims GODC converges faster because plain Dice gives small per-voxel gradients to large
objects and large ones to small objects (Eq. 7).  GODC's weights are per SAMPLE (w_b = U_b / mean_b U),
so the task is built such that samples in a batch differ in object size: every image holds either
1-3 tiny discs (radius 1.5-3 px) or one large ellipse (radii 10-22 px), at random positions, in
Gaussian noise on a smooth random background.

Both runs of a seed use the same network initialisation, the same training batches (same order),
the same validation set and the same optimiser (Adam); only the Dice class differs:
  plain: nnU-Net's MemoryEfficientSoftDiceLoss(batch_dice=False, do_bg=False, smooth=1e-5)
  godc : nnunet_ext.losses.GODCDiceLoss(batch_dice=False, do_bg=False, smooth=1e-5)
``--loss dice`` uses the Dice term alone (as in the paper), ``--loss dice_ce`` nnU-Net's
Dice + CE hybrid (weights 1/1) built with ``build_dice_ce_loss``.

Network: dynamic_network_architectures PlainConvUNet, 2D, 4 stages (8-16-32-64 features),
instance norm, LeakyReLU, no deep supervision.  Validation: hard (argmax) Dice per image, averaged
over the small-object images, the large-object images, and all images ("overall"), every
``--eval-every`` iterations.

Usage:  python -m benchmarks.godc_convergence --iters 400 --seeds 0 1 2 [--loss dice dice_ce] [--write-readme]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from benchmarks.readme_results import add_write_readme_argument, write_results
from nnunet_ext.losses import GODCDiceLoss, build_dice_ce_loss

DICE_CLASSES = {'plain': MemoryEfficientSoftDiceLoss, 'godc': GODCDiceLoss}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def make_sample(rng: np.random.RandomState, size: int, small: bool, noise: float):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    seg = np.zeros((size, size), dtype=bool)
    if small:
        for _ in range(rng.randint(1, 4)):
            r = rng.uniform(1.5, 3.0)
            cy, cx = rng.uniform(4, size - 4, 2)
            seg |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    else:
        ry, rx = rng.uniform(10, 22, 2)
        cy, cx = rng.uniform(ry * 0.6, size - ry * 0.6), rng.uniform(rx * 0.6, size - rx * 0.6)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dy * np.cos(t) + dx * np.sin(t), -dy * np.sin(t) + dx * np.cos(t)
        seg |= (u / ry) ** 2 + (v / rx) ** 2 <= 1
    # smooth background: low-frequency sinusoid bias, + noise
    fy, fx, ph = rng.uniform(0.02, 0.08, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
    bias = 0.3 * np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
    img = seg.astype(np.float32) * 1.0 + bias + rng.normal(0, noise, (size, size))
    return img.astype(np.float32), seg.astype(np.int64)


def make_batch(rng, n, size, noise, small_flags=None):
    if small_flags is None:
        small_flags = rng.rand(n) < 0.5
    imgs, segs = zip(*[make_sample(rng, size, bool(s), noise) for s in small_flags])
    return torch.from_numpy(np.stack(imgs)[:, None]), torch.from_numpy(np.stack(segs)[:, None]), np.asarray(small_flags)


# --------------------------------------------------------------------------------------------------
# model / loss
# --------------------------------------------------------------------------------------------------
def make_net():
    return PlainConvUNet(input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv2d,
                         kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=2, num_classes=2,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.InstanceNorm2d,
                         norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={'inplace': True}, deep_supervision=False)


def make_loss(kind: str, mode: str):
    dice_class = DICE_CLASSES[kind]
    if mode == 'dice':
        return dice_class(apply_nonlin=softmax_helper_dim1, batch_dice=False, do_bg=False, smooth=1e-5, ddp=False)
    lm = LabelManager({'background': 0, 'object': 1}, None)
    return build_dice_ce_loss(lm, batch_dice=False, is_ddp=False, dice_class=dice_class)


@torch.no_grad()
def evaluate(net, imgs, segs, small_flags):
    net.eval()
    pred = net(imgs).argmax(1, keepdim=True)
    net.train()
    tp = ((pred == 1) & (segs == 1)).flatten(1).sum(1).float()
    denom = ((pred == 1).flatten(1).sum(1) + (segs == 1).flatten(1).sum(1)).float()
    dice = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(tp)).numpy()
    return float(dice.mean()), float(dice[small_flags].mean()), float(dice[~small_flags].mean())


def train_one(kind, mode, seed, args, val):
    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    loss_fn = make_loss(kind, mode)
    rng = np.random.RandomState(1000 + seed)  # training stream: identical for both losses
    curve = []  # (iteration, overall, small, large)
    for it in range(1, args.iters + 1):
        x, y, _ = make_batch(rng, args.batch_size, args.size, args.noise)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % args.eval_every == 0 or it == args.iters:
            curve.append((it, *evaluate(net, *val)))
    return np.array(curve)


def first_reach(curve, col, target):
    hit = np.nonzero(curve[:, col] >= target)[0]
    return int(curve[hit[0], 0]) if len(hit) else None


def convergence_rows(results, seeds, targets, eval_every):
    """The table of one loss: per seed and the mean over seeds, plain then GODC (see the legend in ``LEGEND``)."""
    cols = {'overall': 1, 'small': 2, 'large': 3}

    def fmt(v):
        return '-' if v is None else str(v)

    head = ['seed', 'loss'] + [f'it@{c}>={t}' for c in ('overall', 'small', 'large') for t in targets] + \
           ['final_all', 'final_small', 'final_large', 'best_all', 'auc_all']
    tail = max(1, 20 // eval_every)  # mean of the last ~20 iterations: less noisy "final"
    rows = []
    for seed in seeds:
        for kind in ('plain', 'godc'):
            c = results[(seed, kind)]
            row = [str(seed), kind]
            row += [fmt(first_reach(c, cols[name], t)) for name in ('overall', 'small', 'large') for t in targets]
            last = c[-tail:]
            row += [f'{last[:, 1].mean():.3f}', f'{last[:, 2].mean():.3f}', f'{last[:, 3].mean():.3f}',
                    f'{c[:, 1].max():.3f}', f'{c[:, 1].mean():.3f}']
            rows.append(row)
    for kind in ('plain', 'godc'):
        cs = [results[(s, kind)] for s in seeds]
        row = ['mean', kind]
        for name in ('overall', 'small', 'large'):
            for t in targets:
                its = [first_reach(c, cols[name], t) for c in cs]
                row.append(fmt(None if any(i is None for i in its) else round(float(np.mean(its)))))
        last = [c[-tail:] for c in cs]
        row += [f'{np.mean([v[:, k].mean() for v in last]):.3f}' for k in (1, 2, 3)]
        row += [f'{np.mean([c[:, 1].max() for c in cs]):.3f}', f'{np.mean([c[:, 1].mean() for c in cs]):.3f}']
        rows.append(row)
    return head, rows


LEGEND = ('it@X>=t: first evaluated iteration with validation Dice >= t ("-" = not reached); final_*: mean of the '
          'evaluations in the last ~20 iterations; best_all: max overall Dice; auc_all: mean overall Dice over all '
          'evaluations (area under the learning curve / iterations). mean rows: it@ averaged over seeds, "-" if any '
          'seed did not reach the target.')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--iters', type=int, default=400)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--loss', choices=['dice', 'dice_ce'], nargs='+', default=['dice'],
                   help='one table per loss (the README block: --loss dice dice_ce)')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--noise', type=float, default=0.5)
    p.add_argument('--n-val', type=int, default=32)
    p.add_argument('--eval-every', type=int, default=5)
    p.add_argument('--targets', type=float, nargs='+', default=[0.7, 0.8])
    p.add_argument('--threads', type=int, default=1)  # >1 thrashes on a loaded 2-core box
    add_write_readme_argument(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    val_rng = np.random.RandomState(12345)
    flags = np.arange(args.n_val) % 2 == 0
    val = make_batch(val_rng, args.n_val, args.size, args.noise, flags)
    setting = (f'iters={args.iters} seeds={args.seeds} lr={args.lr} (Adam) batch={args.batch_size} '
               f'size={args.size}x{args.size} noise={args.noise} val={args.n_val} images ({flags.sum()} small-object, '
               f'{(~flags).sum()} large-object), eval every {args.eval_every} it')
    print(f'# GODC convergence benchmark: loss={args.loss} {setting}')
    fg = val[1].flatten(1).sum(1).float()
    print(f'# val foreground voxels: small images mean {fg[torch.from_numpy(flags)].mean():.1f}, '
          f'large images mean {fg[torch.from_numpy(~flags)].mean():.1f}')

    markdown = [f'Plain soft Dice vs GODC on the 2D small/large-object task (`benchmarks/godc_convergence.py`: '
                f'{setting}; same initialisation, batches and optimiser for both):']
    for mode in args.loss:
        results = {}
        for seed in args.seeds:
            for kind in ('plain', 'godc'):
                t = time.time()
                results[(seed, kind)] = train_one(kind, mode, seed, args, val)
                print(f'# loss {mode} seed {seed} {kind:5s} done in {time.time() - t:.1f}s', flush=True)
        head, rows = convergence_rows(results, args.seeds, args.targets, args.eval_every)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print(f'# loss {mode}')
        print(' '.join(h.rjust(w) for h, w in zip(head, widths)))
        for r in rows:
            print(' '.join(v.rjust(w) for v, w in zip(r, widths)))
        title = 'Dice term alone (as in the paper)' if mode == 'dice' else "nnU-Net's Dice + CE (weights 1/1)"
        markdown += ['', f'{title}:', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        markdown += ['| ' + ' | '.join(r) + ' |' for r in rows]
    print(f'# {LEGEND}')
    if args.write_readme:
        write_results('godc-convergence', '\n'.join(markdown + ['', LEGEND]))


if __name__ == '__main__':
    main()
