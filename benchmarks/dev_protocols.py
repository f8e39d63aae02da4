"""Development protocols over classes the reported QuickDraw protocols never use.

    python -m harness --plugins benchmarks/dev_protocols.py run --protocol quickdraw_fscil_dev ...

quickdraw_fscil_dev has quickdraw_fscil's shape (60 base classes, then 8 sessions of 5-way
5-shot) on the next 100 classes of the same seeded order: numpy.random.RandomState(1993)
.permutation(345)[100:200], disjoint from the first 100 that quickdraw100_10x10,
quickdraw40_4x10, quickdraw20_2x10 and quickdraw_fscil take. Few-shot settings are chosen
here, never on quickdraw_fscil.

A plugin, not a built-in: GMM's shipped stage-1 alignment trained on these classes (those no
built-in protocol uses). GMM on this protocol aligns anew without them; the built-in
protocols keep the shipped alignment whatever plugins are loaded.
"""
from __future__ import annotations

import numpy as np

from harness.protocol import Protocol, register_protocol
from protocols.quickdraw import BUNDLE

with np.load(BUNDLE) as _npz:
    _NAMES = [str(n) for n in _npz["class_names"]]
_ORDER = np.random.RandomState(1993).permutation(len(_NAMES))

register_protocol(Protocol(
    name="quickdraw_fscil_dev", dataset="quickdraw", num_classes=100, num_tasks=9, increment=5, base_classes=60,
    shots=5, class_order=[_NAMES[i] for i in _ORDER[100:200]], image_size=28, channels=1, noun="drawing",
    family="quickdraw", description="development few-shot CIL: quickdraw_fscil's shape on 100 other classes"))
