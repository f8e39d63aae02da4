"""Progress bars: one per training epoch (a plugin), one over tasks (the runner).

Every method trains with EpochProgress, so it is also where each training iteration ends
at a safe point for a swallowed Ctrl-C (harness.interrupts)."""
from __future__ import annotations

import sys

from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm

from harness import interrupts


class EpochProgress(SupervisedPlugin):
    """A transient bar over the mini-batches of each epoch, showing the running loss."""

    transient = ("bar",)  # not checkpointed (harness.state)

    def __init__(self, disable: bool = False):
        super().__init__()
        self.disable = disable
        self.bar = None

    def before_training_epoch(self, strategy, **kwargs):
        if self.disable:
            return
        total = len(strategy.dataloader) if hasattr(strategy.dataloader, "__len__") else None
        desc = f"  epoch {strategy.clock.train_exp_epochs + 1}/{strategy.train_epochs}"
        self.bar = tqdm(total=total, desc=desc, leave=False, disable=self.disable, file=sys.stderr, dynamic_ncols=True)

    def after_training_iteration(self, strategy, **kwargs):
        interrupts.check()  # a Ctrl-C that a callback swallowed stops training here
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 10 == 0:
                self.bar.set_postfix(loss=f"{strategy.loss.detach().item():.3f}", refresh=False)

    def after_training_epoch(self, strategy, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
