"""iCaRL: ours (methods/icarl.py) vs Avalanche 0.6's built-in `avalanche.training.ICaRL`.

Same stream (harness.data.prepare + harness.streams.build_benchmark), seed, ConvNet
(Avalanche's strategy gets it split into feature extractor + nn.Linear classifier,
as it requires), SGD lr 0.01 momentum 0.9, batch 64, epochs per task, memory 2000,
no augmentation, no lr schedule; ours with the paper's BCE loss (`icarl.loss=bce`), like
Avalanche's. Ours against PyCIL's iCaRL, on our QuickDraw recipe: benchmarks/peer_pycil.py.
Both are scored by the harness's Evaluator: Avalanche's through its own NME eval
classifier (TrainEvalModel in eval mode returns negative distances to class means).
Wall time = training + evaluation of the whole stream, in the same process; CPU time
(all threads of the process) is printed too, as it moves less than wall time when
other processes share the machine.

`--diagnose` first trains both on the first task only and splits Avalanche's gap:
its NME as shipped (class means average the exemplars' features with those of their
horizontally flipped copies), its NME without the flipped copies, and the accuracy of
its linear training head (how well the features were trained at all).

    python benchmarks/peer_icarl.py [--protocol quickdraw100_10x10] [--seed 0] [--epochs 10] [--memory 2000]
                                    [--max-train-per-class N] [--tasks N] [--diagnose]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import metrics  # noqa: E402
from harness.nn.backbones import ConvNet  # noqa: E402
from harness.data import prepare  # noqa: E402
from harness.evaluation import Evaluator  # noqa: E402
from harness.cil.memory import class_means, nme_scores  # noqa: E402
from harness.method import MethodContext, materialise  # noqa: E402
from harness.params import resolve_params  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402
from harness.registry import METHODS, discover  # noqa: E402
from harness.runner import seed_everything  # noqa: E402
from harness.streams import build_benchmark  # noqa: E402


class AvalancheICaRL:
    """Avalanche's strategy behind the harness contract (learn / class_scores)."""

    name = "avalanche_icarl"

    def __init__(self, protocol, device, epochs: int, memory: int):
        from avalanche.training import ICaRL

        features = ConvNet(protocol.channels, protocol.image_size)
        classifier = nn.Linear(features.out_dim, protocol.num_classes)
        model_params = [*features.parameters(), *classifier.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.strategy = ICaRL(
                feature_extractor=features, classifier=classifier,
                optimizer=torch.optim.SGD(model_params, lr=0.01, momentum=0.9),
                memory_size=memory, buffer_transform=None, fixed_memory=True,
                train_mb_size=64, train_epochs=epochs, eval_mb_size=256, device=device, evaluator=None,
            )
        self.icarl = next(p for p in self.strategy.plugins if type(p).__name__ == "_ICaRLPlugin")

    def learn(self, experience):
        self.strategy.train(experience)

    @torch.no_grad()
    def class_scores(self, x):
        self.strategy.model.eval()
        return self.strategy.model(x.to(self.strategy.device))

    def memory_usage(self):
        return sum(len(x) for x in self.icarl.x_memory), sum(x.numel() for x in self.icarl.x_memory)

    def exemplars(self):
        return torch.cat(self.icarl.x_memory), torch.tensor([c for ys in self.icarl.y_memory for c in ys])


# Avalanche's ICaRL settings (its QuickDraw peer recipe), not our QuickDraw recipe: equal footing.
PEER_SETTINGS = {"backbone": "convnet", "lr": 0.01, "batch_size": 64, "weight_decay": 0.0, "init_weight_decay": -1.0,
                 "lr_schedule": "none", "augment": "none", "loss": "bce"}


def ours(data, device, epochs: int, memory: int, seed: int):
    cls = METHODS.get("icarl")
    p = data.protocol
    sets = [("icarl", "memory", str(memory)), *(("icarl", k, str(v)) for k, v in PEER_SETTINGS.items())]
    hp, _ = resolve_params(cls, p.family, sets, {"epochs": epochs})
    return cls(context=MethodContext(p, data.class_names, device, seed, data.in_memory, quiet=True), hp=hp)


def run(make, data, seed: int, tasks: int | None = None) -> dict:
    seed_everything(seed)  # same ConvNet initialisation for both
    benchmark = build_benchmark(data)
    learner = make()
    evaluator = Evaluator(benchmark.test_stream, data.in_memory, data.task_classes())
    matrix, step_acc, seen, most = [], [], 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    for step, experience in enumerate(benchmark.train_stream[:tasks]):
        seen += len(experience.classes_in_this_experience)
        learner.learn(experience)
        scores = evaluator.evaluate(learner, step, seen)
        matrix.append(scores.row)
        step_acc.append(scores.seen)
        most = max(most, learner.memory_usage()[0])
    return {**metrics.summarise(matrix, step_acc), "wall_time_s": time.perf_counter() - start,
            "cpu_time_s": time.process_time() - cpu, "most_exemplars": most}


def diagnose(data, device, epochs: int, memory: int, seed: int) -> None:
    """Both trained on the first task only: where does Avalanche's first-task gap come from?"""
    x, y = materialise(build_benchmark(data).test_stream[0].dataset.eval())
    x = x.to(device)
    seed_everything(seed)
    mine = ours(data, device, epochs, memory, seed)
    mine.learn(build_benchmark(data).train_stream[0])
    seed_everything(seed)
    theirs = AvalancheICaRL(data.protocol, device, epochs, memory)
    theirs.learn(build_benchmark(data).train_stream[0])

    def acc(scores):
        return f"{100.0 * (scores.argmax(1).cpu() == y).float().mean().item():.1f}%"

    n = mine.means.shape[0]
    with torch.no_grad():
        ours_nme, ours_head = acc(mine.class_scores(x)), acc(mine.model.eval()(x)[:, :n])
        model = theirs.strategy.model.eval()
        features = model.feature_extractor(x)
        ex, ey = theirs.exemplars()
        plain_means = class_means(model.feature_extractor(ex.to(device)), ey.to(device), range(n))
        their_nme, their_plain, their_head = (acc(theirs.class_scores(x)), acc(nme_scores(features, plain_means)),
                                              acc(model.train_classifier(features)[:, :n]))
    print(f"first task only ({n} classes):\n  ours: NME {ours_nme}, linear head {ours_head}\n"
          f"  avalanche: NME as shipped {their_nme}, NME without flipped copies {their_plain}, "
          f"linear head {their_head}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="quickdraw100_10x10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--memory", type=int, default=2000)
    ap.add_argument("--max-train-per-class", type=int, help="cap the training data (quick checks)")
    ap.add_argument("--tasks", type=int, help="stop after this many tasks")
    ap.add_argument("--diagnose", action="store_true", help="first split Avalanche's first-task gap (see above)")
    args = ap.parse_args()
    discover(())
    device = torch.device("cpu")
    data = prepare(get_protocol(args.protocol), max_train_per_class=args.max_train_per_class)
    p = data.protocol
    learners = {
        "ours (methods/icarl.py)": lambda: ours(data, device, args.epochs, args.memory, args.seed),
        "avalanche.training.ICaRL": lambda: AvalancheICaRL(p, device, args.epochs, args.memory),
    }
    print(f"{args.protocol}, seed {args.seed}, ConvNet, SGD 0.01 m0.9, batch 64, {args.epochs} epochs/task, "
          f"memory {args.memory}, {torch.get_num_threads()} CPU threads", flush=True)
    if args.diagnose:
        diagnose(data, device, args.epochs, args.memory, args.seed)
    run_side_by_side(learners, data, args.seed, args.tasks)


def run_side_by_side(learners: dict, data, seed: int, tasks: int | None, out: dict | None = None) -> int:
    """Run each learner on the stream, then print one row each; returns the width of the name column.
    `out`, where given, receives each learner's summary by name."""
    out = {} if out is None else out
    for name, make in learners.items():
        out[name] = r = run(make, data, seed, tasks)
        print(f"  {name}: done in {r['wall_time_s']:.0f} s (last {r['last_accuracy']:.1f}%)", flush=True)
    width = max(map(len, out))
    print(f"\n{'':{width}}  {'last %':>7} {'avg %':>7} {'forget %':>8} {'wall s':>7} {'cpu s':>7} "
          f"{'max mem':>7}  A_t per task")
    for name, r in out.items():
        steps = " ".join(f"{a:.1f}" for a in r["step_accuracy"])
        forget = "-" if r["average_forgetting"] is None else f"{r['average_forgetting']:.1f}"  # one task: none
        print(f"{name:{width}}  {r['last_accuracy']:7.1f} {r['avg_incremental_accuracy']:7.1f} "
              f"{forget:>8} {r['wall_time_s']:7.0f} {r['cpu_time_s']:7.0f} {r['most_exemplars']:7d}  {steps}")
    return width


if __name__ == "__main__":
    main()
