"""Do SLBF's binary parts learn? Bits flipped and selections changed under a plain optimizer.

Compresses the shipped trained ResNet-20 (``pretrained:resnet20-fmnist``) with SLBF from its
weights, then runs ``--steps`` steps of a plain ``torch.optim.SGD`` over
``model.parameters()`` on real Fashion-MNIST (cross-entropy, no cnnpress training loop), and
counts what changed in the bank and the selections; BWN under the same steps counts the
weight signs that flipped. Writes JSON with the command, commit and machine::

    python benchmarks/slbf_learning.py --steps 60 --out benchmarks/results/slbf_learning.json
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import cnnpress
from cnnpress.data import Loader, load_dataset
from cnnpress.methods.binary import BinaryConv2d
from cnnpress.methods.slbf import learning_stats, snapshot
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)


def _steps(model: torch.nn.Module, args: argparse.Namespace) -> float:
    data = load_dataset("fashion-mnist", "train")
    loader = Loader(data, args.batch_size, train=True, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model.train()
    correct = count = 0
    for i, (x, y) in enumerate(loader):
        if i >= args.steps:
            break
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        correct += int((out.argmax(1) == y).sum())
        count += y.numel()
    return 100.0 * correct / max(1, count)


def slbf_run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    net = cnnpress.load("pretrained:resnet20-fmnist")
    model = cnnpress.compress(
        net, "slbf", slice_channels=args.slice_channels, num_filters=args.num_filters
    )
    before = snapshot(model)
    acc = _steps(model, args)
    stats = learning_stats(model, before)
    return {"train_accuracy": acc, **stats}


def bwn_run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = cnnpress.compress(cnnpress.load("pretrained:resnet20-fmnist"), "bwn")
    layers = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    signs = [torch.sign(m.weight.detach()).clone() for m in layers]
    acc = _steps(model, args)
    flipped = sum(
        int((torch.sign(m.weight.detach()) != s).sum()) for m, s in zip(layers, signs, strict=True)
    )
    return {
        "train_accuracy": acc,
        "signs_flipped": flipped,
        "weights": sum(s.numel() for s in signs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--slice-channels", type=int, default=8)
    parser.add_argument("--num-filters", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = parser.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    torch.set_num_threads(args.threads)
    t0 = time.time()
    result = {
        **script_provenance(args.out, args.allow_dirty),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "slbf": slbf_run(args),
        "bwn": bwn_run(args),
        "seconds": time.time() - t0,
    }
    total = result["slbf"]["total"]
    print(
        f"SLBF: {total['bits_flipped']}/{total['bank_bits']} bank bits flipped, "
        f"{total['selections_changed']}/{total['selections']} selections changed, "
        f"{total['filters_used']}/{total['num_filters']} bank filters used; "
        f"BWN: {result['bwn']['signs_flipped']}/{result['bwn']['weights']} signs flipped"
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
