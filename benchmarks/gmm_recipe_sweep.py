"""GMM's per-task recipe, chosen on a development protocol (never on the reported quickdraw100_10x10).

Runs `gmm` through the harness for each candidate (aligned stack, the paper's AdamW recipe:
weight decay 0.05 and none on biases, a per-iteration linear warm-up then cosine to a third
of the peak lr, a fresh optimizer per task) and prints one row per candidate: zero-shot
accuracy of task 1 before training, first-task accuracy right after it, Avg, Last,
forgetting and wall time. Finished runs are read back, not rerun (the harness skips them),
so the table can be printed again at no cost.

    python benchmarks/gmm_recipe_sweep.py [--protocol quickdraw40_4x10] [--out results/reference] [--only K ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.registry import METHODS, discover  # noqa: E402
from harness.runner import RunSpec, plan_label  # noqa: E402

# The paper: lr 3e-6, min 1e-6, 200 warm-up iterations at batch 2 (400 samples: 25 of our batch-16
# iterations), 5 epochs. The candidates scale the lr for a 135M LM and a 4-token projection.
_PAPER = ["gmm.lr_schedule=warmup_cosine", "gmm.warmup_steps=25", "gmm.decay_biases=false"]
CANDIDATES = {
    "lr 1e-3, 1 epoch": [*_PAPER, "gmm.lr=1e-3", "gmm.min_lr=3e-4", "gmm.epochs=1"],
    "lr 3e-4, 1 epoch": [*_PAPER, "gmm.lr=3e-4", "gmm.min_lr=1e-4", "gmm.epochs=1"],
    "lr 1e-4, 1 epoch": [*_PAPER, "gmm.lr=1e-4", "gmm.min_lr=3e-5", "gmm.epochs=1"],
    "lr 3e-4, 2 epochs": [*_PAPER, "gmm.lr=3e-4", "gmm.min_lr=1e-4", "gmm.epochs=2"],
    "lr 3e-4, 1 epoch, unaligned": [*_PAPER, "gmm.lr=3e-4", "gmm.min_lr=1e-4", "gmm.epochs=1", "gmm.align=none"],
}


def finished(folder: Path, params: dict) -> dict | None:
    """The summary of a finished seed-0 run under `folder` with these settings, whatever its
    label (labels name the settings that differ from the defaults of their day). A setting
    added to GMM after the run is absent from its config: the rest must agree."""
    for config in sorted(folder.glob("*/seed0/config.json")):
        summary = config.with_name("summary.json")
        ran = json.loads(config.read_text())["params"]
        if summary.exists() and all(ran[k] == v for k, v in params.items() if k in ran):
            return json.loads(summary.read_text())
    return None


def run(protocol: str, sets: list[str], out: str) -> dict:
    """One candidate's summary, run through the harness first unless already finished."""
    overrides = tuple(("gmm", *s.split(".", 1)[1].split("=", 1)) for s in sets)
    _, protocol_dir, hp, _ = plan_label(RunSpec("gmm", protocol, 0, out, overrides=overrides))
    declared = METHODS.get("gmm").params
    params = json.loads(json.dumps({k: v for k, v in hp.items() if declared[k].affects_results}))
    folder = ROOT / out / protocol_dir
    if finished(folder, params) is None:
        subprocess.run([sys.executable, "-m", "harness", "run", "--methods", "gmm", "--protocol", protocol,
                        "--out", out, "--set", *sets], cwd=ROOT, check=True)
    return finished(folder, params)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", default="quickdraw40_4x10")
    ap.add_argument("--out", default="results/reference")
    ap.add_argument("--only", nargs="+", type=int, help="candidate numbers (1-based) to run")
    args = ap.parse_args(argv)
    discover()
    if args.protocol.startswith("quickdraw100"):
        sys.exit("choose the recipe on a development protocol, not on the reported one")
    rows = []
    for k, (name, sets) in enumerate(CANDIDATES.items(), 1):
        if args.only and k not in args.only:
            continue
        s = run(args.protocol, sets, args.out)
        zs = s.get("zero_shot_accuracy") or [float("nan")]
        rows.append((name, zs[0], s["accuracy_matrix"][0][0], s["avg_incremental_accuracy"], s["last_accuracy"],
                     s["average_forgetting"], s["wall_time_s"] / 60))
    print(f"\n{args.protocol}, seed 0")
    print("| candidate | zero-shot task 1 | task 1 after training | Avg | Last | Forgetting | wall (min) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | " + " | ".join(f"{v:.1f}" for v in r[1:]) + " |")


if __name__ == "__main__":
    main()
