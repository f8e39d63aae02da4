"""A wrapped Avalanche strategy against the same strategy run standalone in Avalanche.

Standalone: Avalanche's own strategy class, its own training loop and its own evaluation
(`strategy.eval` with `accuracy_metrics(experience=True)`), on the harness's QuickDraw stream,
model (IncrementalNet on the protocol's backbone) and SGD settings. Through the harness: the
same strategy by name (`python -m harness run --methods NAME`). Same seed, no augmentation,
no lr schedule (Avalanche's defaults), so both see the same data in the same order.

Avalanche's evaluation iterates DataLoaders, which draw a seed from torch's RNG; the harness's
evaluation does not. The standalone run restores torch's RNG around each `eval` so that the
training of both runs sees the same random numbers: with that, the two accuracy matrices are
expected to be equal. Prints both, side by side, per strategy.

    python benchmarks/avalanche_identity.py                       # lwf ewc replay der, quickdraw20_2x10
    python benchmarks/avalanche_identity.py --strategies ewc --epochs 2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.cli import main as harness_main  # noqa: E402
from harness.registry import METHODS, discover  # noqa: E402
from harness.runner import _prepared, get_protocol, seed_everything  # noqa: E402
from harness.streams import build_benchmark  # noqa: E402


def standalone(name: str, protocol: str, epochs: int, seed: int, max_train: int | None) -> list[list[float]]:
    """The strategy as a user of Avalanche alone would run it (the harness only builds the data and model)."""
    import avalanche.training as training
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    cls = METHODS.get(name)
    spec, strategy_class = cls.spec, cls.strategy_class
    hp = {k: p.default for k, p in cls.params.items()}
    hp.update(cls.protocol_defaults.get(get_protocol(protocol).family, {}))
    data = _prepared(protocol, None, False, max_train)
    p = data.protocol
    seed_everything(seed)
    benchmark = build_benchmark(data)
    from harness.nn.backbones import IncrementalNet, create_backbone
    model = IncrementalNet(create_backbone(hp["backbone"], p.channels, p.image_size))
    if spec.model is not None:  # the model change the spec names (a fixed head for DER), done the same way
        model = spec.model(type("Run", (), {"context": type("C", (), {"protocol": p})()})(), model)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                                weight_decay=hp["weight_decay"])
    own = {k: hp[k] for k in strategy_params_of(cls)}
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    strategy = getattr(training, strategy_class.__name__)(
        model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=hp["batch_size"],
        train_epochs=epochs, eval_mb_size=max(256, hp["batch_size"]), device="cpu", evaluator=evaluator, **own)
    matrix = []
    for t, experience in enumerate(benchmark.train_stream):
        strategy.train(experience)
        state = torch.get_rng_state()
        metrics = strategy.eval(benchmark.test_stream[: t + 1])
        torch.set_rng_state(state)
        matrix.append([round(100 * metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"], 2)
                       for j in range(t + 1)])
    return matrix


def strategy_params_of(cls) -> list[str]:
    from harness.cil.avalanche_strategies import strategy_params
    return list(strategy_params(cls.strategy_class, cls.spec))


def through_harness(name: str, protocol: str, epochs: int, seed: int, max_train: int | None) -> list[list[float]]:
    with tempfile.TemporaryDirectory() as out:
        args = ["run", "--methods", name, "--protocol", protocol, "--epochs", str(epochs), "--seeds", str(seed),
                "--device", "cpu", "--threads", "1", "--quiet", "--out", out, "--set", f"{name}.augment=none",
                "--set", f"{name}.lr_schedule=none"]
        if max_train:
            args += ["--max-train-per-class", str(max_train)]
        if harness_main(args) != 0:
            raise SystemExit(f"the harness run of {name} failed")
        summary = json.loads(next(Path(out).rglob("summary.json")).read_text())
        return [[round(a, 2) for a in row] for row in summary["accuracy_matrix"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["lwf", "ewc", "replay", "der"])
    parser.add_argument("--protocol", default="quickdraw20_2x10")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-per-class", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    discover()
    torch.set_num_threads(1)  # float sums depend on the thread count: one for both runs
    from harness import threads
    threads.fix(1)
    print(f"protocol {args.protocol}, {args.epochs} epochs, seed {args.seed}, 1 thread; CPU: {_cpu()}")
    for name in args.strategies:
        alone = standalone(name, args.protocol, args.epochs, args.seed, args.max_train_per_class)
        harness = through_harness(name, args.protocol, args.epochs, args.seed, args.max_train_per_class)
        print(f"\n{name} ({METHODS.get(name).strategy_class.__name__}): "
              f"{'equal' if alone == harness else 'DIFFERENT'}")
        for t, (a, h) in enumerate(zip(alone, harness)):
            print(f"  after task {t + 1}: avalanche {a}   harness {h}")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
