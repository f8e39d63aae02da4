"""MAE-CIL's rebuilt exemplars against the real images they stand for.

Trains MAE-CIL (methods/mae_cil.py) through the first tasks of a protocol, then takes the
test images of every class seen, keeps a random share of each one's patches (1 - mask_ratio)
exactly as an exemplar is stored, rebuilds it with the decoder, and prints:
- background: the mean rebuilt value of decoder-filled pixels that are 0 in the real
  image (QuickDraw's background is 0; grey haze shows as a high value);
- grey share: decoder-filled pixels in [0.25, 0.75], against the real images' share;
- accuracy on the real test images and on their rebuilt versions, by the method's own
  prediction (nearest rebuilt mean or head) and by its head, and the ratio rebuilt / real.
The acceptance checks (methods/mae_cil.py, README): background <= MAX_BACKGROUND and
rebuilt / real accuracy >= MIN_RATIO.

    python benchmarks/mae_rebuild_check.py [--protocol quickdraw20_2x10] [--tasks 1] [--seed 0]
        [--set mae_cil.KEY=VALUE ...] [--max-train-per-class N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.data import prepare  # noqa: E402
from harness.method import MethodContext  # noqa: E402
from harness.params import parse_set_options, resolve_params  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402
from harness.registry import METHODS, discover  # noqa: E402
from harness.runner import seed_everything  # noqa: E402
from harness.streams import build_benchmark  # noqa: E402
from methods.mae_cil import MAX_BACKGROUND, MIN_RATIO, rebuilt_exemplars, rebuilt_vs_real  # noqa: E402


def save_grid(method, images: torch.Tensor, labels: torch.Tensor, seed: int, path: str) -> None:
    from torchvision.utils import save_image

    first = torch.stack([(labels == c).nonzero()[0, 0] for c in labels.unique()[:16]])
    rebuilt = rebuilt_exemplars(method, images[first], seed)[0]
    save_image(torch.cat([images[first], rebuilt]), path, nrow=len(first), padding=1, pad_value=0.5)
    print(f"  images: {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", default="quickdraw20_2x10")
    ap.add_argument("--tasks", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train-per-class", type=int)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--png", help="also save real (top) and rebuilt (bottom) test images, one per class, here")
    args = ap.parse_args(argv)

    discover()
    protocol = get_protocol(args.protocol)
    cls = METHODS.get("mae_cil")
    hp, changed = resolve_params(cls, protocol.family, parse_set_options(args.set))
    data = prepare(protocol, None, False, args.max_train_per_class)
    seed_everything(args.seed)
    benchmark = build_benchmark(data)
    method = cls(context=MethodContext(protocol, data.class_names, torch.device("cpu"), args.seed, data.in_memory,
                                       quiet=True), hp=hp)
    seen: list[int] = []
    start = time.perf_counter()
    for experience in list(benchmark.train_stream)[: args.tasks]:
        method.learn(experience)
        seen += [int(c) for c in experience.classes_in_this_experience]
    train_s = time.perf_counter() - start
    test = data.test
    mask = torch.isin(torch.as_tensor(test.targets), torch.as_tensor(seen))
    images = test.images[mask].float() / 255
    labels = torch.as_tensor(test.targets)[mask]
    r = rebuilt_vs_real(method, images, labels, args.seed)
    if args.png:
        save_grid(method, images, labels, args.seed, args.png)
    print(f"mae_cil {' '.join(f'{k}={v}' for k, v in changed.items()) or '(defaults)'} on {args.protocol}, "
          f"{args.tasks} task(s), {len(seen)} classes, {len(images)} test images; training {train_s:.0f} s")
    print(f"  background of decoder-filled pixels {r['background']:.3f} (check <= {MAX_BACKGROUND})")
    print(f"  grey share of decoder-filled pixels {100 * r['grey_share']:.1f}% (real {100 * r['grey_share_real']:.1f}%)")
    print(f"  accuracy real {r['acc_real']:.1f}%  rebuilt {r['acc_rebuilt']:.1f}%  ratio {r['ratio']:.2f} "
          f"(check >= {MIN_RATIO});  head: real {r['head_acc_real']:.1f}%  rebuilt {r['head_acc_rebuilt']:.1f}%")
    ok = r["background"] <= MAX_BACKGROUND and r["ratio"] >= MIN_RATIO
    print("  checks " + ("pass" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
