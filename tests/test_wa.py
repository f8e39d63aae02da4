"""WA: weight aligning and its loss against PyCIL's formulas on fixed tensors."""
import torch
import torch.nn.functional as F
from torch import nn

from harness.cil.weight_aligning import align_new_class_weights
from methods.wa import wa_loss


def test_new_rows_take_the_old_rows_mean_norm_and_biases_stay():
    torch.manual_seed(0)
    head = nn.Linear(8, 10)
    with torch.no_grad():
        head.weight[7:] *= 5  # the new classes' rows grew larger, as a biased head's do
    old_rows, new_rows, bias = head.weight[:7].clone(), head.weight[7:].clone(), head.bias.clone()
    norms = head.weight.norm(dim=1)
    expected_gamma = float(norms[:7].mean() / norms[7:].mean())
    gamma = align_new_class_weights(head, 3)
    after = head.weight.norm(dim=1)
    assert abs(gamma - expected_gamma) < 1e-6 and gamma < 1
    assert torch.allclose(after[7:].mean(), after[:7].mean())
    assert torch.equal(head.weight[:7], old_rows) and torch.equal(head.bias, bias)
    # The direction of each new row is kept: only its length changes.
    assert torch.allclose(F.normalize(head.weight[7:], dim=1), F.normalize(new_rows, dim=1), atol=1e-6)


def test_no_old_class_no_alignment():
    head = nn.Linear(4, 5)
    before = head.weight.clone()
    assert align_new_class_weights(head, 5) == 1.0 and torch.equal(head.weight, before)


def test_the_loss_has_pycil_wa_s_gradients():
    torch.manual_seed(1)
    logits = torch.randn(6, 10, requires_grad=True)
    labels = torch.randint(0, 10, (6,))
    teacher = torch.randn(6, 7)
    t = 2.0
    # PyCIL models/wa.py: (1 - known/total) CE + known/total * _KD_loss, _KD_loss the soft cross-entropy.
    share = 7 / 10
    soft = -(torch.softmax(teacher / t, 1) * torch.log_softmax(logits[:, :7] / t, 1)).sum() / 6
    pycil = (1 - share) * F.cross_entropy(logits, labels) + share * soft
    (g_pycil,) = torch.autograd.grad(pycil, logits)
    (g_ours,) = torch.autograd.grad(wa_loss(logits, labels, teacher, t), logits)
    assert torch.allclose(g_ours, g_pycil, atol=1e-6)
    assert torch.equal(wa_loss(logits, labels, None, t), F.cross_entropy(logits, labels))
