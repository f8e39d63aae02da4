"""Distillation losses shared by rehearsal and regularisation methods."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients: the 'previous model' of KD methods."""
    old = copy.deepcopy(model).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


def softmax_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
               t_squared: bool = True) -> torch.Tensor:
    """Hinton et al.'s KD on the teacher's classes: KL(teacher_T || student_T), batch mean,
    times T^2 when `t_squared` (Hinton's gradient scaling).

    PyCIL's iCaRL and FACIL's LwF use no T^2 factor; PyCIL writes it as the cross-entropy
    -sum(teacher_T * log student_T), which differs from the KL by the teacher's entropy, a
    constant: same gradients.
    """
    t = temperature
    n = teacher_logits.shape[1]
    log_p = F.log_softmax(student_logits[:, :n] / t, dim=1)
    q = F.softmax(teacher_logits / t, dim=1)
    kl = F.kl_div(log_p, q, reduction="batchmean")
    return kl * t * t if t_squared else kl


def sigmoid_distillation_targets(new_targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """iCaRL's BCE targets: the old model's sigmoid outputs for old classes, one-hot for new ones."""
    targets = new_targets.clone()
    n_old = teacher_logits.shape[1]
    targets[:, :n_old] = torch.sigmoid(teacher_logits)
    return targets


def sigmoid_distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None, per_class: str = "sum"
) -> torch.Tensor:
    """iCaRL's loss: binary cross-entropy on every output, one-hot targets for the labels,
    the teacher's sigmoid outputs as targets for its (old) classes.

    per_class="sum" sums over classes (mean over the batch), so each output gets a
    gradient of the size cross-entropy gives it; "mean" averages over classes as
    Avalanche's ICaRL does, which shrinks every gradient by the number of classes
    (the original iCaRL made up for it with learning rate 2.0). PyCIL's iCaRL uses no BCE
    at all: softmax cross-entropy on every seen class plus KL distillation (T=2).
    """
    targets = F.one_hot(labels, logits.shape[1]).float()
    if teacher_logits is not None:
        targets = sigmoid_distillation_targets(targets, teacher_logits)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.sum(1).mean() if per_class == "sum" else loss.mean()


def pod_spatial(maps: list[torch.Tensor], old_maps: list[torch.Tensor]) -> torch.Tensor:
    """PODNet's POD-spatial (Douillard et al. 2020, eq. 2-3; PyCIL's `pod_spatial_loss`): per stage,
    the squared activations summed along the height and along the width, the two pooled vectors
    concatenated and L2-normalised per image, the L2 distance of new to old; batch mean, stage mean."""
    loss = maps[0].new_zeros(())
    for a, b in zip(maps, old_maps):
        a, b = a.pow(2), b.pow(2)
        pooled_a = torch.cat([a.sum(dim=3).flatten(1), a.sum(dim=2).flatten(1)], dim=1)
        pooled_b = torch.cat([b.sum(dim=3).flatten(1), b.sum(dim=2).flatten(1)], dim=1)
        loss = loss + torch.linalg.vector_norm(F.normalize(pooled_a, dim=1) - F.normalize(pooled_b, dim=1), dim=1).mean()
    return loss / len(maps)


def feature_cosine_distance(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(new, old) over the batch (torch's cosine embedding loss with target 1): LUCIR's
    less-forget constraint (Hou et al. 2019, eq. 6; FACIL's lucir.py) and PODNet's POD-flat."""
    return F.cosine_embedding_loss(features, old_features, features.new_ones(len(features)))


def pod_flat(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """PODNet's POD-flat (PyCIL: `cosine_embedding_loss` with target 1): mean of 1 - cos(new, old)."""
    return feature_cosine_distance(features, old_features)


def margin_ranking(cosines: torch.Tensor, labels: torch.Tensor, n_old: int, k: int = 2,
                   margin: float = 0.5) -> torch.Tensor:
    """LUCIR's inter-class separation (Hou et al. 2019, eq. 8; FACIL's lucir.py): for each sample of an
    old class, its class's cosine must exceed each of the `k` highest new-class cosines by `margin`;
    hinge, mean over those pairs; zero when the batch holds no old-class sample."""
    old = labels < n_old
    if not old.any():
        return cosines.new_zeros(())
    target = cosines[old].gather(1, labels[old, None])  # (n, 1)
    hardest_new = cosines[old, n_old:].topk(min(k, cosines.shape[1] - n_old), dim=1).values  # (n, k)
    target = target.expand_as(hardest_new)
    return F.margin_ranking_loss(target.reshape(-1), hardest_new.reshape(-1), torch.ones_like(target.reshape(-1)),
                                 margin=margin)


def nca_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """PODNet's NCA loss on the local-similarity classifier's scores (the authors' `nca`, with
    `exclude_pos_denominator`): the target's score less `margin`, every score shifted by the row's
    maximum; the denominator sums exp over the other classes plus exp(0) in the target's place.
    PyCIL's `nca` subtracts its margin (0.6) from every class, where it cancels: margin 0 here."""
    rows = torch.arange(len(labels), device=scores.device)
    scores = scores.clone()
    scores[rows, labels] -= margin
    scores = scores - scores.max(dim=1, keepdim=True).values
    target = scores[rows, labels]
    others = scores.clone()
    others[rows, labels] = 0.0  # exp(0) = 1 in the target's place, as both codes compute it
    return (torch.logsumexp(others, dim=1) - target).mean()


def balanced_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, class_weights: torch.Tensor,
                temperature: float = 2.0) -> torch.Tensor:
    """FOSTER's balanced distillation (Wang et al. 2022; PyCIL's `BKD`): the teacher's softened
    probabilities times per-class weights, renormalised, as the targets of the student's softened
    log-probabilities; cross-entropy summed over classes, batch mean, no T^2 factor."""
    t = temperature
    soft = F.softmax(teacher_logits / t, dim=1) * class_weights
    soft = soft / soft.sum(dim=1, keepdim=True)
    return -(soft * F.log_softmax(student_logits / t, dim=1)).sum(dim=1).mean()
