"""A plugin file: `icarl_avalanche_trace`, Avalanche's ICaRL with a per-epoch trace of its training.

Each epoch appends one JSON line to $TRACE (default icarl_avalanche_trace.jsonl): the task, the
epoch, the mean loss, the mean and largest gradient norm, the weights' norm, the lr, and the
mean feature norm and share of dead features (zero on every sample) of the epoch's last batch.
The hooks only read, so the run's accuracies are those of `icarl_avalanche` with the same
settings (docs/avalanche-strategies.md: the collapse at lr 1 on quickdraw100_10x10).

    TRACE=trace.jsonl python -m harness --plugins benchmarks/icarl_avalanche_trace.py run \\
        --methods icarl_avalanche_trace --protocol quickdraw100_10x10 --seeds 0 \\
        --set icarl_avalanche_trace.lr=1 --out /tmp/trace
"""
from __future__ import annotations

import json
import os

import torch

import methods.avalanche  # noqa: F401  (registers icarl_avalanche)
from harness.registry import METHODS, register_method


@register_method("icarl_avalanche_trace")
class TracedICaRL(METHODS.get("icarl_avalanche")):
    def _before_training_epoch(self, **kwargs):
        self._trace = {"loss": 0.0, "steps": 0, "grad": 0.0, "grad_max": 0.0}
        super()._before_training_epoch(**kwargs)

    def _after_backward(self, **kwargs):
        norm = float(torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None]).norm())
        t = self._trace
        t["loss"] += float(self.loss.detach())
        t["steps"] += 1
        t["grad"] += norm
        t["grad_max"] = max(t["grad_max"], norm)
        super()._after_backward(**kwargs)

    @torch.no_grad()
    def _after_training_epoch(self, **kwargs):
        t, steps = self._trace, max(self._trace["steps"], 1)
        training = self.model.training
        features = self.model.eval().feature_extractor(self.mb_x)
        self.model.train(training)
        record = {"task": self.clock.train_exp_counter, "epoch": self.clock.train_exp_epochs,
                  "loss": t["loss"] / steps, "grad_norm": t["grad"] / steps, "grad_norm_max": t["grad_max"],
                  "weight_norm": float(torch.stack([p.norm() for p in self.model.parameters()]).norm()),
                  "lr": self.optimizer.param_groups[0]["lr"], "feature_norm": float(features.norm(dim=1).mean()),
                  "dead_features": float((features.abs().sum(0) == 0).float().mean())}
        with open(os.environ.get("TRACE", "icarl_avalanche_trace.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        super()._after_training_epoch(**kwargs)
