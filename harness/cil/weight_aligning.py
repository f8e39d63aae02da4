"""Weight aligning (Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental
Learning", CVPR 2020): after a task, the classifier rows of the new classes are scaled so that
their mean L2 norm equals the old classes'. A head trained on many new images and few exemplars
grows larger weights for the new classes, which biases its argmax towards them; the paper shows
the norms' ratio tracks that bias.

As PyCIL's `IncrementalNet.weight_align` (utils/inc_net.py): one factor
gamma = mean ||w_old|| / mean ||w_new|| for every new row, weights only (biases untouched).
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def align_new_class_weights(classifier: nn.Linear, new_classes: int) -> float:
    """Scale the last `new_classes` rows of classifier.weight to the old rows' mean norm; gamma."""
    weight = classifier.weight
    if new_classes <= 0 or new_classes >= weight.shape[0]:
        return 1.0  # no old class (first task) or nothing new: nothing to align to
    norms = weight.norm(p=2, dim=1)
    gamma = norms[:-new_classes].mean() / norms[-new_classes:].mean()
    weight[-new_classes:] *= gamma
    return float(gamma)
