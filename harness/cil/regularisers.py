"""Avalanche's regularisation plugins as a setting of any method that declares them.

`--set finetune.regularizer=ewc` (or si, mas, rwalk) adds Avalanche's plugin to the method's
training: its penalty joins the method's own loss, its importances are checkpointed and
restored like any plugin's state (harness.state). `regularizer_lambda` weighs the penalty;
0 keeps the value used for the same strategy by name (`ewc`, `si`, `mas`, `rwalk`).
"""
from __future__ import annotations

from typing import Any

from avalanche.training.plugins import LFLPlugin, RWalkPlugin, SynapticIntelligencePlugin

from harness.params import Param

# The penalty weight of each when regularizer_lambda is 0: the defaults of the strategies by
# name (methods/avalanche.py; EWC's chosen on quickdraw20_2x10).
DEFAULT_LAMBDA = {"ewc": 100.0, "si": 1.0, "mas": 1.0, "rwalk": 0.1}

REGULARISER_PARAMS: dict[str, Param] = {
    "regularizer": Param("none", "an Avalanche regularisation plugin added to training",
                         choices=("none", *DEFAULT_LAMBDA)),
    "regularizer_lambda": Param(0.0, "weight of its penalty; 0 = "
                                + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LAMBDA.items()), low=0.0),
}


class TrainModeRWalkPlugin(RWalkPlugin):
    """Avalanche's RWalkPlugin, except that the model trains in training mode.

    Avalanche 0.6's RWalkPlugin computes its gradient without penalty in `model.eval()` before
    every iteration and never switches back, so after the first iteration the model trains in
    eval mode: batch norm then normalises with its initial running statistics and never updates
    them (on quickdraw100_10x10 the first task ended at chance, 10.0%, against Naive's 84.0%).
    """

    def before_training_iteration(self, strategy, *args, **kwargs):
        training = strategy.model.training
        super().before_training_iteration(strategy, *args, **kwargs)
        strategy.model.train(training)


class TrainModeLFLPlugin(LFLPlugin):
    """Avalanche's LFLPlugin, except that the model trains in training mode.

    Avalanche 0.6's LFLPlugin computes both models' features for its penalty in `model.eval()`
    before every backward pass and never switches back, so from the second experience on the
    model trains in eval mode (batch norm frozen at its running statistics); on
    quickdraw40_4x10 the loss became NaN in task 2, step 6, at every λ_e from 0.001 to 1.
    """

    def before_backward(self, strategy, **kwargs):
        training = strategy.model.training
        super().before_backward(strategy, **kwargs)
        strategy.model.train(training)


class CorrectedSIPlugin(SynapticIntelligencePlugin):
    """Avalanche's SynapticIntelligencePlugin with its snapshots copied and no negative importance.

    Avalanche 0.6 stores the weights before each step and at the start of each experience as
    `param.detach().cpu().flatten()`, which on CPU is a view of the live parameter whenever it is
    contiguous (every weight but channels-last convolutions): the step it measures is then zero,
    so those weights get no importance and no penalty (their anchor moves with them). Copying
    the snapshots gives every weight the path integral of Zenke et al.

    Avalanche sets the importance to minus the accumulated path integral over the squared
    displacement, clipped from above only (at 0.001); a weight whose steps went uphill on the
    loss (momentum, noise) gets a negative importance, and the penalty then rewards moving it
    away without bound (the training loss reached -inf in task 5 of quickdraw100_10x10). The
    paper's importance is a sum of loss decreases and Mammoth's (lr·g²) is never negative:
    clamped at 0 here.
    """

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        _own_copies(self.ewc_data[0])  # the anchor of the penalty and of the displacement

    def before_training_iteration(self, strategy, **kwargs):
        super().before_training_iteration(strategy, **kwargs)
        _own_copies(self.syn_data["old_theta"])  # the weights before the step

    def after_training_exp(self, strategy, **kwargs):
        super().after_training_exp(strategy, **kwargs)
        for importance in self.ewc_data[1].values():
            importance.data.clamp_(min=0.0)


def _own_copies(snapshot: dict) -> None:
    for param_data in snapshot.values():
        param_data.data = param_data.data.clone()


def regulariser_plugins(hp: dict[str, Any]) -> list:
    """The plugin the settings ask for (none where the method does not declare `regularizer`)."""
    kind = hp.get("regularizer", "none")
    if kind == "none":
        return []
    from avalanche.training.plugins import EWCPlugin, MASPlugin

    weight = hp["regularizer_lambda"] or DEFAULT_LAMBDA[kind]
    if kind == "ewc":
        return [EWCPlugin(ewc_lambda=weight)]
    if kind == "si":
        return [CorrectedSIPlugin(si_lambda=weight)]
    if kind == "mas":
        return [MASPlugin(lambda_reg=weight)]
    return [TrainModeRWalkPlugin(ewc_lambda=weight)]
