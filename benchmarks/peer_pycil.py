"""A method of ours vs PyCIL's own, on the same stream, in one run: `--model icarl` (ours
`loss=ce_kd`), `wa`, `bic`, `der` (ours `der_expand`), `memo`, `podnet` or `foster`.

PyCIL (https://github.com/G-U-N/PyCIL) is neither a dependency nor vendored: point
`--pycil` at a local checkout. Its `models/<model>.py` trains as shipped (iCaRL: softmax CE +
KD at T=2, herding, NME; WA: (1-λ) CE + λ KD, weight aligning, the head; BiC: WA's loss, a bias layer fitted on a held-out
split, the head; DER: an extractor per task, CE + auxiliary CE, weight aligning, the head; MEMO: DER's, growing the
last stage alone on a shared trunk (its settings are exps/memo.json's, its epochs and milestones scaled as
the others' module constants); PODNet: NCA on its proxies' classifier, POD-spatial and POD-flat,
class-balanced fine-tuning (its 160 + 20 epochs scaled to --epochs), cosine schedule, NME; FOSTER: boosting a
second extractor beside the frozen one, then its compression into one by balanced KD (exps/foster.json's settings,
170 + 130 epochs scaled to --epochs, cosine schedules), scored by the boosted pair's head as its eval_task; all SGD momentum
0.9, lr 0.1, batch 128, weight decay 5e-4 then 2e-4, a new optimizer and MultiStepLR per
task); this script only
- hands it the harness's QuickDraw stream (same classes, same order, same train/test split)
  through its `DataManager`, as a dataset of single-channel 28x28 images with the crop
  (shift up to `crop_padding` px) + flip augmentation of our recipe;
- sets its module-level epochs and scales its milestones to them (PyCIL's CIFAR-100
  values: 200 epochs, milestones 60/120/170, then 170 epochs, milestones 80/120 for iCaRL
  and 60/100/140 for WA);
- keeps a fixed number of exemplars per class on both sides (PyCIL's `fixed_memory`,
  ours `icarl.memory_per_class`; 20 x 100 classes = 2000 at the end): with a total of 2000
  shared by the classes seen, the first task's quota (200 per class) exceeds QuickDraw's 80
  training doodles per class, which PyCIL's herding does not allow;
- with `--backbone convnet_bn` (default, our recipe's backbone) gives its network our
  `ConvNetBN`; `--backbone resnet32` keeps PyCIL's own ResNet-32 (3 input channels: the
  grey image is repeated).
Both are scored by the harness's Evaluator (PyCIL's iCaRL by NME through its own class
means and feature extractor, the others by their head's logits, as PyCIL's CNN accuracy);
PyCIL's own top-1 after each task (NME for iCaRL, CNN for the others) is printed too, as a
check that the two evaluations agree. Wall time = training + evaluation of the whole stream in
this process (PyCIL also measures test accuracy every 5 epochs, as it ships; BiC's accuracy
after every epoch of both of its stages is skipped, see PyCILLearner). `--csv FILE` appends one line
(method,peer,seed,ours_avg,ours_last,peer_avg,peer_last,ours_wall_s,peer_wall_s), e.g. to
results/reference/quickdraw100_10x10/peers.csv.

    python benchmarks/peer_pycil.py --pycil ~/src/PyCIL [--model icarl|wa|bic|der|memo|podnet|foster] [--protocol quickdraw100_10x10]
        [--seed 0] [--epochs 30] [--backbone convnet_bn|resnet32] [--memory-per-class 20] [--tasks N]
        [--max-train-per-class N] [--pycil-workers 8] [--csv FILE] [--ours-only] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import functools
import importlib
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.nn.backbones import ConvNetBN, split_last_stage  # noqa: E402
from harness.data import prepare  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.method import MethodContext, materialise  # noqa: E402
from harness.params import resolve_params  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402
from harness.registry import METHODS, discover  # noqa: E402
from peer_icarl import run_side_by_side  # noqa: E402

# PyCIL's schedules for CIFAR-100 (models/icarl.py, models/wa.py), scaled to --epochs.
PYCIL_INIT = (200, (60, 120, 170))
# BiC has one schedule for every task: its first task's is set to its later one.
PYCIL_LATER = {"icarl": (170, (80, 120)), "wa": (170, (60, 100, 140)), "bic": (170, (60, 100, 140)),
               "der": (170, (80, 120, 150)), "memo": (170, (80, 120, 150)), "podnet": (160, ()), "foster": (170, ())}
PYCIL_CLASS = {"icarl": "iCaRL", "wa": "WA", "bic": "BiC", "der": "DER", "memo": "MEMO", "podnet": "PODNet",
               "foster": "FOSTER"}
PODNET_EPOCHS, PODNET_FT_EPOCHS = 160, 20  # models/podnet.py's, scaled to --epochs
OURS = {"der": "der_expand"}  # our name where it differs from PyCIL's (Avalanche's `der` is another method)
HEAD_SCORED = ("wa", "bic", "der", "memo", "foster")  # scored by their head (PyCIL's CNN accuracy); iCaRL by NME
CSV_HEADER = "method,peer,seed,ours_avg,ours_last,peer_avg,peer_last,ours_wall_s,peer_wall_s"


def scaled(schedule: tuple[int, tuple[int, ...]], epochs: int) -> list[int]:
    total, milestones = schedule
    return sorted({max(1, round(m * epochs / total)) for m in milestones if round(m * epochs / total) < epochs})


class _PyCILConvNet(nn.Module):
    """Our ConvNetBN behind PyCIL's convnet interface ({'fmaps', 'features'}, out_dim)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.net = ConvNetBN(in_channels)
        self.out_dim = self.net.out_dim

    def forward(self, x):
        maps = self.net.stage_maps(x)  # each stage's output: PODNet's POD-spatial reads them
        return {"fmaps": maps, "features": self.net.pool(maps[-1]).flatten(1)}


def _memo_parts(in_channels: int, args=None, pretrained=False):
    """Our ConvNetBN cut as ours is (split_last_stage), as PyCIL's get_convnet gives MEMO its
    (generalised, specialised) pair; the specialised block names its width `feature_dim`."""
    trunk, block = split_last_stage(ConvNetBN(in_channels))
    block.feature_dim = block.out_dim
    return trunk, block


# exps/memo.json's settings but its schedule's length, which the learner scales (its CIFAR-100 values).
MEMO_JSON = {"train_base": True, "train_adaptive": False, "skip": False, "scheduler": "steplr", "t_max": None,
             "init_lr": 0.1, "init_weight_decay": 5e-4, "init_lr_decay": 0.1, "lrate": 0.1, "batch_size": 128,
             "weight_decay": 2e-4, "lrate_decay": 0.1, "alpha_aux": 1.0}


# exps/foster.json's settings; its epochs are set from --epochs (boosting) and scaled (compression, 130 of 170).
FOSTER_JSON = {"beta1": 0.96, "beta2": 0.97, "oofc": "ft", "is_teacher_wa": False, "is_student_wa": False,
               "lambda_okd": 1, "wa_value": 1, "init_lr": 0.1, "init_weight_decay": 5e-4, "lr": 0.1,
               "batch_size": 128, "weight_decay": 5e-4, "T": 2}
FOSTER_EPOCHS, FOSTER_COMPRESSION_EPOCHS = 170, 130


def grey(x: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) float images -> (N, H, W) uint8, what PIL reads as 'L' images (PyCIL's and FACIL's datasets)."""
    return x.mul(255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def load_pycil(root: Path) -> dict:
    """PyCIL's modules this benchmark drives, imported from the checkout at `root`."""
    if not (root / "models" / "icarl.py").is_file():
        raise HarnessError(f"--pycil {root}: no models/icarl.py there; point it at a PyCIL checkout")
    sys.path.insert(0, str(root))
    try:
        return {name: importlib.import_module(name)
                for name in (*(f"models.{m}" for m in PYCIL_CLASS), "utils.data_manager", "utils.data",
                             "utils.inc_net")}
    except ImportError as e:
        raise HarnessError(f"--pycil {root}: PyCIL does not import here ({e})") from None


class PyCILLearner:
    """PyCIL's iCaRL or WA behind the harness contract (learn / class_scores / memory_usage).
    `own` collects PyCIL's own top-1 after each task (NME for iCaRL, CNN for the others)."""

    def __init__(self, pycil: dict, model: str, data, device: torch.device, epochs: int, per_class: int,
                 backbone: str, padding: int, workers: int, seed: int, own: list[float]):
        module, data_manager, idata, inc_net = (pycil[k] for k in (f"models.{model}", "utils.data_manager",
                                                                   "utils.data", "utils.inc_net"))
        from torchvision import transforms

        module.init_epoch, module.epochs = epochs, epochs
        module.init_milestones = scaled(PYCIL_LATER[model] if model == "bic" else PYCIL_INIT, epochs)
        module.milestones = scaled(PYCIL_LATER[model], epochs)
        module.num_workers = workers
        if hasattr(module, "tqdm"):
            module.tqdm = functools.partial(module.tqdm, disable=True)  # its per-epoch progress bars
        warnings.filterwarnings("ignore", message="This DataLoader will create")  # 8 workers on 2 cores

        train_x, train_y = materialise(data.train)
        test_x, test_y = materialise(data.test)

        repeat = [transforms.Grayscale(num_output_channels=3)] if backbone == "resnet32" else []

        class QuickDraw(idata.iData):
            use_path = False
            train_trsf = [*repeat, transforms.RandomCrop(data.protocol.image_size, padding=padding),
                          transforms.RandomHorizontalFlip(), transforms.ToTensor()]
            test_trsf = [*repeat, transforms.ToTensor()]
            common_trsf = []
            class_order = list(range(data.protocol.num_classes))  # labels are already in arrival order

            def download_data(self):
                self.train_data, self.train_targets = grey(train_x), train_y.numpy()
                self.test_data, self.test_targets = grey(test_x), test_y.numpy()

        data_manager._get_idata = lambda name: QuickDraw()
        if backbone == "convnet_bn":
            inc_net.get_convnet = (functools.partial(_memo_parts, data.protocol.channels) if model == "memo" else
                                   lambda args, pretrained=False: _PyCILConvNet(data.protocol.channels))
        p = data.protocol
        args = {"convnet_type": "memo_resnet32" if model == "memo" else backbone, "device": [device], "memory_size": per_class * p.num_classes,
                "fixed_memory": True, "memory_per_class": per_class, "seed": seed, "model_name": model, "dataset": "quickdraw",
                "init_cls": p.first_task_classes, "increment": p.increment, "pretrained": False}
        self.manager = data_manager.DataManager("quickdraw", False, seed, p.first_task_classes, p.increment)
        if model == "memo":  # MEMO reads its settings from args (exps/memo.json), not module constants
            args.update(MEMO_JSON, init_epoch=epochs, epochs=epochs, init_milestones=scaled(PYCIL_INIT, epochs),
                        milestones=scaled(PYCIL_LATER[model], epochs))
        if model == "foster":  # settings from args (exps/foster.json), as MEMO's
            args.update(FOSTER_JSON, init_epochs=epochs, boosting_epochs=epochs, num_workers=workers,
                        compression_epochs=max(1, round(FOSTER_COMPRESSION_EPOCHS * epochs / FOSTER_EPOCHS)))
        self.learner = getattr(module, PYCIL_CLASS[model])(args)
        if model == "podnet":
            module.ft_epochs = max(1, round(PODNET_FT_EPOCHS * epochs / PODNET_EPOCHS))
        if model in ("podnet", "foster"):  # its test accuracy every few epochs changes nothing: skipped, to time the training
            self.learner._compute_accuracy = lambda *a, **k: 0.0
        if model == "bic":
            # PyCIL's BiC holds out int(0.1 * memory_size / known classes) samples per class, memory_size
            # / known classes being the exemplars per class of a shared budget; with a fixed number per
            # class it is set to that number x the known classes, so 10% of each class's exemplars are
            # held out (2 of 20), as on our side. Its accuracy on the training and test sets after every
            # epoch of both stages is a log line that changes nothing: skipped, to time the training.
            self.learner._compute_accuracy = lambda *a, **k: 0.0
            train = self.learner.incremental_train

            def incremental_train(manager):
                self.learner._memory_size = per_class * max(1, self.learner._known_classes)
                return train(manager)
            self.learner.incremental_train = incremental_train
        self.model, self.device, self.channels3, self.own = model, device, backbone == "resnet32", own
        self.name = f"pycil:{model}"  # how the evaluator names it in errors

    def learn(self, experience):
        self.learner.incremental_train(self.manager)
        cnn, nme = self.learner.eval_task()
        self.own.append(float((cnn if self.model in HEAD_SCORED else nme)["top1"]))
        self.learner.after_task()

    @torch.no_grad()
    def class_scores(self, x):
        net = self.learner._network.eval()
        x = x.to(self.device)
        if self.channels3:
            x = x.expand(-1, 3, -1, -1)
        if self.model in HEAD_SCORED:  # the aligned or bias-corrected head, as PyCIL's CNN accuracy
            return net(x)["logits"][:, : self.learner._total_classes]
        f = F.normalize(net.extract_vector(x).float(), dim=1)
        means = torch.as_tensor(self.learner._class_means[: self.learner._total_classes], dtype=torch.float32)
        return f @ F.normalize(means.to(self.device), dim=1).T  # unit vectors: cosine order = distance order

    def memory_usage(self):
        n = len(self.learner._targets_memory)
        return n, n * int(np.prod(self.learner._data_memory.shape[1:])) if n else 0


def our_params(model: str, data, epochs: int, per_class: int, backbone: str, extra: list[str] = ()) -> dict:
    """Our method's settings: the shared stream's, then `extra` (KEY=VALUE, a diagnostic --set)."""
    name = OURS.get(model, model)
    sets = [(name, "memory_per_class", str(per_class)), (name, "backbone", backbone)]
    sets += [("icarl", "loss", "ce_kd")] if model == "icarl" else []
    if model == "foster":  # the compression's epochs scaled as PyCIL's side scales them
        sets.append(("foster", "compression_epochs", str(max(1, round(FOSTER_COMPRESSION_EPOCHS * epochs / FOSTER_EPOCHS)))))
    for item in extra:
        key, eq, value = item.partition("=")
        if not eq or key not in METHODS.get(name).params:
            raise HarnessError(f"--set {item!r}: expected KEY=VALUE with KEY a setting of {name}")
        sets.append((name, key, value))
    return resolve_params(METHODS.get(name), data.protocol.family, sets, {"epochs": epochs})[0]


def ours(model: str, data, device, hp: dict, seed: int):
    p = data.protocol
    return METHODS.get(OURS.get(model, model))(
        context=MethodContext(p, data.class_names, device, seed, data.in_memory, quiet=True), hp=hp)


def append_csv(path: Path, model: str, seed: int, ours_r: dict, peer_r: dict | None, peer: str = "") -> None:
    """One line of peers.csv (header written with the first line); the peer's fields empty where
    it was not run (--ours-only); `peer` names it (default pycil:<model>)."""
    name = peer or f"pycil:{model}"
    peer = ["", "", ""] if peer_r is None else [f"{peer_r['avg_incremental_accuracy']:.2f}",
                                                f"{peer_r['last_accuracy']:.2f}", f"{peer_r['wall_time_s']:.0f}"]
    line = ",".join([OURS.get(model, model), name, str(seed),
                     f"{ours_r['avg_incremental_accuracy']:.2f}", f"{ours_r['last_accuracy']:.2f}", *peer[:2],
                     f"{ours_r['wall_time_s']:.0f}", peer[2]])
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8") as fh:
        fh.write((CSV_HEADER + "\n" if new else "") + line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pycil", required=True, type=Path, help="a local checkout of PyCIL")
    ap.add_argument("--model", default="icarl", choices=tuple(PYCIL_CLASS), help="the method on both sides")
    ap.add_argument("--csv", type=Path, help="append the line of peers.csv to this file")
    ap.add_argument("--protocol", default="quickdraw100_10x10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30, help="epochs of every task, both learners")
    ap.add_argument("--backbone", default="convnet_bn", choices=("convnet_bn", "resnet32"))
    ap.add_argument("--memory-per-class", type=int, default=20)
    ap.add_argument("--pycil-workers", type=int, default=8, help="PyCIL's DataLoader workers (it ships 8)")
    ap.add_argument("--max-train-per-class", type=int, help="cap the training data (quick checks)")
    ap.add_argument("--tasks", type=int, help="stop after this many tasks")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="change a setting of ours (a diagnostic: what a difference between the two sides is worth)")
    ap.add_argument("--ours-only", action="store_true",
                    help="run our side alone (a second seed of ours beside the peer's first)")
    args = ap.parse_args()
    discover(())
    device = torch.device("cpu")
    if args.set and args.csv:
        sys.exit("error: --set changes our side from the shared settings: its line does not go to --csv")
    try:
        data = prepare(get_protocol(args.protocol), max_train_per_class=args.max_train_per_class)
        if data.protocol.dataset != "quickdraw" or not data.in_memory:
            raise HarnessError(f"{args.protocol}: this benchmark feeds PyCIL in-memory QuickDraw protocols only")
        hp = our_params(args.model, data, args.epochs, args.memory_per_class, args.backbone, args.set)
        pycil = load_pycil(args.pycil.expanduser())
    except HarnessError as e:
        sys.exit(f"error: {e}")
    print(f"{args.protocol}, seed {args.seed}, {args.backbone}, {args.epochs} epochs/task, "
          f"{args.memory_per_class} exemplars per class, "
          f"{torch.get_num_threads()} CPU threads\n  ours: lr {hp['lr']} batch {hp['batch_size']}, weight decay "
          f"{hp['init_weight_decay'] if hp['init_weight_decay'] >= 0 else hp['weight_decay']} then {hp['weight_decay']}, {hp['lr_schedule']} schedule, {hp['augment']} "
          f"(pad {hp['crop_padding']})\n  PyCIL: its own settings, " + (
              "a cosine schedule" if args.model in ("podnet", "foster") else
              f"multistep milestones {scaled(PYCIL_LATER[args.model] if args.model == 'bic' else PYCIL_INIT, args.epochs)}"
              f" then {scaled(PYCIL_LATER[args.model], args.epochs)}"), flush=True)
    own: list[float] = []
    ours_name = f"ours (methods/{OURS.get(args.model, args.model)}.py" + (", loss=ce_kd)" if args.model == "icarl" else ")")
    peer_name = f"PyCIL models/{args.model}.py"
    learners = {ours_name: lambda: ours(args.model, data, device, hp, args.seed)}
    if not args.ours_only:
        learners[peer_name] = lambda: PyCILLearner(pycil, args.model, data, device, args.epochs, args.memory_per_class,
                                                   args.backbone, hp["crop_padding"], args.pycil_workers, args.seed,
                                                   own)
    results: dict = {}
    width = run_side_by_side(learners, data, args.seed, args.tasks, results)
    which = "CNN" if args.model in HEAD_SCORED else "NME"
    if not args.ours_only:
        print(f"{f'PyCIL own eval_task {which} top-1':{width}}  {'':>7} {'':>7} {'':>8} {'':>7} {'':>7} {'':>7}  "
              + " ".join(f"{a:.1f}" for a in own))
    if args.csv:
        append_csv(args.csv, args.model, args.seed, results[ours_name], results.get(peer_name))
        print(f"appended to {args.csv}")

if __name__ == "__main__":
    main()
