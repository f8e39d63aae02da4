"""Protocols: declarative descriptions of a class-incremental benchmark.

A protocol names a dataset, how many of its classes take part and in which order
(a seeded permutation, as PyCIL and Avalanche do), the size of the first task and of
every later one, and a few facts methods may need (image size, the noun a generative
method uses in its sentences). It holds no data: `harness.data` loads it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from harness.errors import HarnessError
from harness.registry import PROTOCOLS


@dataclass(frozen=True)
class Protocol:
    name: str
    dataset: str  # a name registered with @register_dataset
    num_classes: int  # classes that take part in the stream
    num_tasks: int
    increment: int  # new classes in every task after the first
    base_classes: int = 0  # classes of the first task; 0 means `increment` (B0)
    class_order_seed: int = 1993
    class_order: Sequence[str] | None = None  # explicit class names, overrides the seed
    shots: int | None = None  # training samples per class after the first task (few-shot CIL)
    image_size: int = 32
    channels: int = 3
    noun: str = "photo"  # "This is a <noun> of a <class>." for generative methods
    augment: str = "none"  # batch augmentation while training: harness.nn.augment.AUGMENTATIONS
    family: str = ""  # groups protocols for per-protocol method defaults (e.g. "cifar100")
    description: str = ""
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def first_task_classes(self) -> int:
        return self.base_classes or self.increment

    def classes_per_task(self) -> list[int]:
        return [self.first_task_classes] + [self.increment] * (self.num_tasks - 1)

    @property
    def shape(self) -> str:
        base = f"B{self.base_classes}" if self.base_classes else "B0"
        shot = f", {self.shots}-shot" if self.shots else ""
        return f"{self.num_classes} classes, {self.num_tasks} tasks, {base} Inc{self.increment}{shot}"

    def validate(self) -> None:
        if self.num_tasks < 1 or self.increment < 1 or self.num_classes < 1:
            raise HarnessError(f"protocol {self.name}: num_classes, num_tasks and increment must be positive")
        total = sum(self.classes_per_task())
        if total != self.num_classes:
            raise HarnessError(
                f"protocol {self.name}: first task {self.first_task_classes} + "
                f"{self.num_tasks - 1} x {self.increment} = {total} classes, but num_classes is {self.num_classes}"
            )
        if self.class_order is not None and len(self.class_order) != self.num_classes:
            raise HarnessError(f"protocol {self.name}: class_order lists {len(self.class_order)} classes, expected {self.num_classes}")
        if self.class_order is not None:
            # A repeated class would otherwise pass here and only fail when its second task finds no data.
            repeated = [c for c, n in Counter(self.class_order).items() if n > 1]
            if repeated:
                names = ", ".join(map(str, repeated))
                raise HarnessError(f"protocol {self.name}: class_order repeats {names}; each class may appear once")
        from harness.nn.augment import AUGMENTATIONS  # here: importing torch is for registration, not lookups

        if self.augment not in AUGMENTATIONS:
            raise HarnessError(f"protocol {self.name}: augment must be one of {', '.join(AUGMENTATIONS)}, not {self.augment!r}")
        if self.shots is not None and self.shots < 1:
            raise HarnessError(f"protocol {self.name}: shots must be positive")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_order"] = list(self.class_order) if self.class_order is not None else None
        return d


def register_protocol(protocol: Protocol) -> Protocol:
    """Validate and register a protocol; returns it so modules can keep a handle."""
    protocol.validate()
    return PROTOCOLS.register(protocol.name, protocol)


def get_protocol(name: str) -> Protocol:
    return PROTOCOLS.get(name)
