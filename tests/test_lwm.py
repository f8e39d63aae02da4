"""LwM and its Grad-CAM building block: maps, the attention loss, exemplars, the CLI."""
import json

import torch

from harness.nn.backbones import IncrementalNet, create_backbone
from harness.cli import main
from harness.cil.distill import frozen_copy
from harness.nn.gradcam import attention_distance, attention_figure, grad_cam, last_conv_block

N_CLASSES = 5


def tiny_net(name: str = "convnet") -> IncrementalNet:
    net = IncrementalNet(create_backbone(name, 1, 28))
    net.head.classifier = torch.nn.Linear(net.backbone.out_dim, N_CLASSES)
    net.head.active_units = torch.ones(N_CLASSES, dtype=torch.int8)
    return net


def attention_loss(old, new, x):
    old_cams, old_logits = grad_cam(old, x)
    new_cams, _ = grad_cam(new, x, old_logits.argmax(1), create_graph=True)
    return attention_distance(new_cams, old_cams.detach())


def test_map_has_the_feature_maps_shape_and_is_non_negative():
    x = torch.rand(4, 1, 28, 28)
    for name, side in (("convnet", 7), ("resnet32", 7)):
        net = tiny_net(name).eval()
        layer = last_conv_block(net, x)
        cams, logits = grad_cam(net, x, torch.tensor([0, 1, 2, 3]), layer)
        assert cams.shape == (4, side, side) and (cams >= 0).all() and cams.sum() > 0
        assert logits.shape == (4, N_CLASSES)


def test_attention_loss_zero_for_identical_models_positive_after_a_change():
    x = torch.rand(8, 1, 28, 28)
    new = tiny_net().eval()
    old = frozen_copy(new)
    assert attention_loss(old, new, x).item() < 1e-6
    with torch.no_grad():
        conv = new.backbone.features[3]  # the last convolution
        conv.weight.add_(0.5 * torch.randn(conv.weight.shape))  # randn_like would follow channels-last
    assert attention_loss(old, new, x).item() > 1e-3


def test_a_step_on_the_attention_loss_moves_the_model_and_reduces_it():
    x = torch.rand(16, 1, 28, 28)
    old = tiny_net().eval()
    new = frozen_copy(old).requires_grad_(True)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    before = {n: p.detach().clone() for n, p in new.named_parameters()}
    opt = torch.optim.SGD(new.parameters(), lr=0.05)
    loss = attention_loss(old, new, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(before["backbone.features.3.weight"], new.backbone.features[3].weight)
    # Layers after the feature map change the loss only through the Grad-CAM weights:
    # they move only because the map was built with create_graph=True.
    assert not torch.equal(before["backbone.features.7.weight"], new.backbone.features[7].weight)
    assert not torch.equal(before["head.classifier.weight"], new.head.classifier.weight)
    assert attention_loss(old, new, x).item() < loss.item()


def test_attention_figure(tmp_path):
    old = tiny_net().eval()
    new = frozen_copy(old)
    fig = attention_figure(old, new, torch.rand(3, 1, 28, 28), tmp_path / "att.png", n_old_classes=3)
    assert (tmp_path / "att.png").stat().st_size > 0
    import matplotlib.pyplot as plt

    plt.close(fig)


def run_lwm(out, *extra):
    args = ["run", "--methods", "lwm", "--protocol", "quickdraw20_2x10", "--epochs", "1", "--max-train-per-class", "16",
            "--quiet", "--device", "cpu", "--out", out, *extra]
    assert main([str(a) for a in args]) == 0


def test_end_to_end_exemplar_free(tmp_path):
    run_lwm(tmp_path)
    s = json.loads((tmp_path / "quickdraw20_2x10+maxtrain=16" / "lwm+epochs=1" / "seed0" / "summary.json").read_text())
    assert len(s["accuracy_matrix"]) == 2 and s["memory_exemplars"] == 0 and s["memory_bytes"] == 0


def test_exemplars_respect_their_budget(tmp_path):
    run_lwm(tmp_path, "--set", "lwm.memory=45")
    s = json.loads((tmp_path / "quickdraw20_2x10+maxtrain=16" / "lwm+epochs=1+memory=45" / "seed0" / "summary.json").read_text())
    # 45 slots: 4 per class over 10 classes, then cut to 2 per class over 20; uint8 28x28 images.
    assert s["memory_exemplars"] == 40 and s["memory_bytes"] == 40 * 28 * 28


def test_teacher_memory_and_old_classes_round_trip(tmp_path):
    from harness.method import MethodContext
    from harness.params import resolve_params
    from harness.protocol import get_protocol
    from harness.registry import METHODS, discover
    from harness.state import restore_method

    discover()
    cls, protocol = METHODS.get("lwm"), get_protocol("quickdraw20_2x10")
    hp, _ = resolve_params(cls, protocol.family, [("lwm", "memory", "20")])
    make = lambda: cls(context=MethodContext(protocol, [str(i) for i in range(20)], torch.device("cpu"), 0, quiet=True), hp=hp)
    method = make()
    method.model = tiny_net(hp["backbone"])
    method.old_model, method.n_old = frozen_copy(method.model), N_CLASSES
    for c in (0, 1):
        method.memory.add(c, torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8))
    torch.save(method.checkpoint_state(), tmp_path / "state.pt")  # LwM has no code for it: the harness saves its attributes
    fresh = make()
    fresh.model = tiny_net(hp["backbone"])
    restore_method(fresh, torch.load(tmp_path / "state.pt", weights_only=True)["state"])
    x = torch.rand(3, 1, 28, 28)
    assert fresh.n_old == N_CLASSES and fresh.memory_usage() == method.memory_usage() == (4, 4 * 28 * 28)
    assert torch.equal(fresh.old_model(x), method.old_model(x))
