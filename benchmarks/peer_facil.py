"""A method of ours vs FACIL's own, on the same stream, in one run: `--model lucir`.

FACIL (https://github.com/mmasana/FACIL) is neither a dependency nor vendored: point `--facil` at a
local checkout. Its `src/approach/lucir.py` trains as shipped, driven task by task as its
`main_incremental.py` drives it (`add_head`, `Appr.train`, evaluation of the task-agnostic head):
cosine heads sharing sigma, the ReLU-free features, CE + the less-forget constraint (lambda 5 x
sqrt(old/new)) + margin ranking (K 2, margin 0.5), herding of a fixed number of exemplars per class,
SGD momentum 0.9 and weight decay 5e-4 at the given lr, and its schedule: the lr divided by 10 when
the loss on a validation split (`--validation`, FACIL's 10% of each class's training data, held out by
a seeded draw as its `memory_dataset.get_data` does) has not improved for 8 epochs, and the best model
by that loss kept at the end of each task. This script only
- hands it the harness's QuickDraw stream (same classes, same order, same train/test split) as FACIL
  `MemoryDataset`s of single-channel 28x28 images with the crop (shift up to `crop_padding` px) + flip
  augmentation of our recipe;
- gives its network our `ConvNetBN` without its last ReLU, as ours has it (FACIL removes that ReLU from
  its own ResNet alone, and warns otherwise);
- keeps a fixed number of exemplars per class on both sides (FACIL's `--num-exemplars-per-class`, ours
  `lucir.memory_per_class`), FACIL's herding selection.
Both are scored by the harness's Evaluator (FACIL's by the argmax of its concatenated heads, its
task-agnostic accuracy); FACIL's own task-agnostic accuracy on the test data of every class seen is
printed too, as a check that the two evaluations agree. Wall time = training + evaluation of the whole
stream in this process (FACIL's validation pass after every epoch included: its schedule needs it).
`--csv FILE` appends one line (method,peer,seed,ours_avg,ours_last,peer_avg,peer_last,ours_wall_s,
peer_wall_s), e.g. to results/reference/quickdraw100_10x10/peers.csv.

    python benchmarks/peer_facil.py --facil ~/src/FACIL [--model lucir] [--protocol quickdraw100_10x10]
        [--seed 0] [--epochs 30] [--memory-per-class 20] [--validation 0.1] [--tasks N]
        [--max-train-per-class N] [--facil-workers 4] [--csv FILE] [--ours-only] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.data import prepare  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.method import materialise  # noqa: E402
from harness.nn.backbones import ConvNetBN, drop_last_relu  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402
from harness.registry import discover  # noqa: E402
from peer_icarl import run_side_by_side  # noqa: E402
from peer_pycil import append_csv, grey, our_params, ours  # noqa: E402

FACIL_LUCIR = {"lr_min": 1e-4, "lr_factor": 10, "lr_patience": 8, "momentum": 0.9, "wd": 5e-4,
               "lamb": 5.0, "lamb_mr": 1.0, "dist": 0.5, "K": 2}  # lucir.py's defaults (its CIFAR-100 ones)


def load_facil(root: Path) -> dict:
    """FACIL's modules this benchmark drives, imported from the checkout at `root`."""
    if not (root / "src" / "approach" / "lucir.py").is_file():
        raise HarnessError(f"--facil {root}: no src/approach/lucir.py there; point it at a FACIL checkout")
    sys.path.insert(0, str(root / "src"))
    try:
        modules = {name: importlib.import_module(name) for name in
                   ("approach.lucir", "networks.network", "datasets.exemplars_dataset", "datasets.memory_dataset")}
    except ImportError as e:
        raise HarnessError(f"--facil {root}: FACIL does not import here ({e})") from None
    # lucir.py's own `nn`, with the margin ranking loss today's torch accepts (torch.nn itself is untouched)
    lucir = modules["approach.lucir"]
    lucir.nn = SimpleNamespace(**{**{k: getattr(nn, k) for k in dir(nn) if not k.startswith("_")},
                                  "MarginRankingLoss": _FlatMarginRankingLoss})
    return modules


class _Backbone(nn.Module):
    """Our ConvNetBN (last ReLU dropped) behind FACIL's network interface: a `head_var` linear layer,
    which LLL_Net strips to read the features."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.net = drop_last_relu(ConvNetBN(in_channels))
        self.head_var = "fc"
        self.fc = nn.Linear(self.net.out_dim, 1)

    def forward(self, x):
        return self.fc(self.net(x))


class _FlatMarginRankingLoss(nn.MarginRankingLoss):
    """FACIL's lucir.py hands MarginRankingLoss (n, 1) scores and an (n,) target, which the torch it was
    written for broadcast and torch >= 2 refuses; with its all-ones target the broadcast loss is the
    mean over the n pairs, which is what this computes."""

    def forward(self, input1, input2, target):
        return super().forward(input1.flatten(), input2.flatten(), target.flatten())


class _NoLog:
    """FACIL's learner logs every epoch's scalars; nothing here reads them."""

    def log_scalar(self, *args, **kwargs):
        pass


class FACILLearner:
    """FACIL's LUCIR behind the harness contract (learn / class_scores / memory_usage). `own` collects
    FACIL's own task-agnostic accuracy on the test data of the classes seen after each task."""

    def __init__(self, facil: dict, data, device: torch.device, epochs: int, lr: float, batch: int,
                 per_class: int, padding: int, validation: float, workers: int, seed: int, own: list[float]):
        from torchvision import transforms

        lucir, network, exemplars, memory = (facil[k] for k in ("approach.lucir", "networks.network",
                                                               "datasets.exemplars_dataset", "datasets.memory_dataset"))
        size = data.protocol.image_size
        self.train_tf = transforms.Compose([transforms.RandomCrop(size, padding=padding),
                                            transforms.RandomHorizontalFlip(), transforms.ToTensor()])
        self.test_tf = transforms.ToTensor()
        train_x, self.train_y = materialise(data.train)
        test_x, self.test_y = materialise(data.test)
        self.train_x, self.test_x = grey(train_x), grey(test_x)
        self.memory_dataset, self.validation, self.rng = memory.MemoryDataset, validation, np.random.RandomState(seed)
        self.batch, self.workers, self.device, self.own = batch, workers, device, own

        warnings.filterwarnings("ignore", message="This DataLoader will create")  # FACIL's 4 workers on 2 cores
        self.net = network.LLL_Net(_Backbone(data.protocol.channels), remove_existing_head=True).to(device)
        store = exemplars.ExemplarsDataset(self.train_tf, None, num_exemplars_per_class=per_class,
                                           exemplar_selection="herding")
        self.appr = lucir.Appr(self.net, device, nepochs=epochs, lr=lr, logger=_NoLog(), exemplars_dataset=store,
                               **FACIL_LUCIR)
        self.task, self.seen = 0, 0
        self.name = "facil:lucir"  # how the evaluator names it in errors

    def _loader(self, x, y, tf, shuffle: bool):
        ds = self.memory_dataset({"x": x, "y": [int(v) for v in y]}, tf)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch, shuffle=shuffle, num_workers=self.workers)

    def learn(self, experience):
        classes = sorted(int(c) for c in experience.classes_in_this_experience)
        train_idx, val_idx = [], []
        for c in classes:  # FACIL's validation split: a seeded draw of each class's training data
            idx = np.flatnonzero(self.train_y.numpy() == c)
            held = set(self.rng.choice(idx, int(round(len(idx) * self.validation)), replace=False).tolist())
            train_idx += [i for i in idx if i not in held]
            val_idx += sorted(held)
        self.net.add_head(len(classes))
        self.net.to(self.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Warning: ReLU not removed")  # ours is dropped already
            self.appr.train(self.task, self._loader(self.train_x[train_idx], self.train_y[train_idx], self.train_tf, True),
                            self._loader(self.train_x[val_idx], self.train_y[val_idx], self.test_tf, False))
        self.seen += len(classes)
        seen = np.flatnonzero(self.test_y.numpy() < self.seen)
        _, _, tag = self.appr.eval(self.task, self._loader(self.test_x[seen], self.test_y[seen], self.test_tf, False))
        self.own.append(100.0 * tag)
        self.task += 1

    @torch.no_grad()
    def class_scores(self, x):
        self.net.eval()
        return torch.cat(self.net(x.to(self.device)), dim=1)

    def memory_usage(self):
        n = len(self.appr.exemplars_dataset)
        return n, n * int(np.prod(self.train_x.shape[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facil", required=True, type=Path, help="a local checkout of FACIL")
    ap.add_argument("--model", default="lucir", choices=("lucir",), help="the method on both sides")
    ap.add_argument("--csv", type=Path, help="append the line of peers.csv to this file")
    ap.add_argument("--protocol", default="quickdraw100_10x10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30, help="epochs of every task, both learners")
    ap.add_argument("--memory-per-class", type=int, default=20)
    ap.add_argument("--validation", type=float, default=0.1,
                    help="FACIL's validation share of each class's training data (its schedule reads it)")
    ap.add_argument("--facil-workers", type=int, default=4, help="FACIL's DataLoader workers (its default)")
    ap.add_argument("--max-train-per-class", type=int, help="cap the training data (quick checks)")
    ap.add_argument("--tasks", type=int, help="stop after this many tasks")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="change a setting of ours (a diagnostic: what a difference between the two sides is worth)")
    ap.add_argument("--ours-only", action="store_true", help="run our side alone (a second seed of ours)")
    args = ap.parse_args()
    discover(())
    device = torch.device("cpu")
    if args.set and args.csv:
        sys.exit("error: --set changes our side from the shared settings: its line does not go to --csv")
    if not 0 < args.validation < 1:
        sys.exit(f"error: --validation {args.validation}: FACIL's schedule needs a share in (0, 1)")
    try:
        data = prepare(get_protocol(args.protocol), max_train_per_class=args.max_train_per_class)
        if data.protocol.dataset != "quickdraw" or not data.in_memory:
            raise HarnessError(f"{args.protocol}: this benchmark feeds FACIL in-memory QuickDraw protocols only")
        hp = our_params(args.model, data, args.epochs, args.memory_per_class, "convnet_bn", args.set)
        facil = load_facil(args.facil.expanduser())
    except HarnessError as e:
        sys.exit(f"error: {e}")
    print(f"{args.protocol}, seed {args.seed}, convnet_bn without its last ReLU, {args.epochs} epochs/task, "
          f"{args.memory_per_class} exemplars per class, {torch.get_num_threads()} CPU threads\n"
          f"  ours: lr {hp['lr']} batch {hp['batch_size']}, weight decay {hp['weight_decay']}, {hp['lr_schedule']} "
          f"schedule, class-balanced fine-tuning {hp['ft_epochs']} epochs, {hp['augment']} (pad {hp['crop_padding']})\n"
          f"  FACIL: lr {hp['lr']} batch {hp['batch_size']}, its lucir.py defaults {FACIL_LUCIR}, "
          f"{args.validation:.0%} of the training data held out for its schedule", flush=True)
    own: list[float] = []
    ours_name, peer_name = f"ours (methods/{args.model}.py)", f"FACIL src/approach/{args.model}.py"
    learners = {ours_name: lambda: ours(args.model, data, device, hp, args.seed)}
    if not args.ours_only:
        learners[peer_name] = lambda: FACILLearner(facil, data, device, args.epochs, hp["lr"], hp["batch_size"],
                                                   args.memory_per_class, hp["crop_padding"], args.validation,
                                                   args.facil_workers, args.seed, own)
    results: dict = {}
    width = run_side_by_side(learners, data, args.seed, args.tasks, results)
    if not args.ours_only:
        print(f"{'FACIL own task-agnostic top-1':{width}}  {'':>7} {'':>7} {'':>8} {'':>7} {'':>7} {'':>7}  "
              + " ".join(f"{a:.1f}" for a in own))
    if args.csv:
        append_csv(args.csv, args.model, args.seed, results[ours_name], results.get(peer_name), f"facil:{args.model}")
        print(f"appended to {args.csv}")


if __name__ == "__main__":
    main()
