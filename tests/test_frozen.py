"""The frozen-encoder building block and the yardstick methods on it (SimpleCIL, RanPAC, FeCAM)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from harness.check import check_method
from harness.errors import HarnessError
from harness.nn.feature_cache import _CACHES
from harness.nn.frozen_encoder import PooledTokens, build_encoder
from harness.protocol import get_protocol
from harness.registry import METHODS, discover
from harness.runner import RunSpec, execute

discover()
QD20 = get_protocol("quickdraw20_2x10")


def _method(name: str, **hp_overrides):
    """A method instance on quickdraw20 with resolved settings (no data read)."""
    from harness.method import MethodContext
    from harness.params import resolve_params

    cls = METHODS.get(name)
    hp, _ = resolve_params(cls, QD20.family, [(None, k, str(v)) for k, v in hp_overrides.items()])
    ctx = MethodContext(QD20, [f"c{i}" for i in range(20)], torch.device("cpu"), seed=3, quiet=True)
    return cls(context=ctx, hp=hp)


def _blobs(n_per_class: int, classes: list[int], dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(classes) + 1, dim, generator=g).abs() * 3
    x = torch.cat([centres[c] + 0.5 * torch.randn(n_per_class, dim, generator=g) for c in classes]).clamp_min(0)
    return x, torch.tensor(classes).repeat_interleave(n_per_class)


def test_ranpac_accumulated_solution_equals_one_solve_on_all_data():
    from methods.ranpac import ridge_solve

    m = _method("ranpac", projection=64)
    (x1, y1), (x2, y2) = _blobs(30, [0, 1, 2]), _blobs(30, [3, 4], seed=1)
    m.fit(x1, y1, [0, 1, 2])
    m.fit(x2, y2, [3, 4])
    h = F.relu(torch.cat([x1, x2]).double() @ m.projection)
    y = F.one_hot(torch.cat([y1, y2]), 5).double()
    expected = ridge_solve(h.T @ h, h.T @ y, m.ridges[-1]).float()
    assert m.readout.shape == (64, 5)
    torch.testing.assert_close(m.readout, expected, rtol=1e-4, atol=1e-5)
    assert m.scores(x2).argmax(1).eq(y2).float().mean() > 0.9
    assert m.state_bytes() == (16 * 64 + 64 * 64 + 64 * 5) * 8  # W, G and C in float64


def test_ranpac_ridge_is_the_grid_point_of_least_validation_error():
    from methods.ranpac import RIDGE_GRID, choose_ridge, ridge_solve

    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 30, generator=g, dtype=torch.float64)
    noisy = h @ torch.randn(30, 4, generator=g, dtype=torch.float64) + 3 * torch.randn(200, 4, generator=g,
                                                                                      dtype=torch.float64)
    chosen = choose_ridge(h, noisy)
    losses = {r: F.mse_loss(h[160:] @ ridge_solve(h[:160].T @ h[:160], h[:160].T @ noisy[:160], r), noisy[160:])
              for r in RIDGE_GRID}
    assert chosen == min(losses, key=losses.get)
    assert choose_ridge(h, h @ torch.ones(30, 4, dtype=torch.float64)) <= 1e-4  # noise-free: barely any ridge


def test_simplecil_is_cosine_to_class_means():
    m = _method("simplecil")
    x, y = _blobs(20, [0, 1, 2, 3])
    m.fit(x, y, [0, 1, 2, 3])
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    test, _ = _blobs(10, [0, 1, 2, 3], seed=5)
    cosine = F.normalize(test, dim=1) @ F.normalize(means, dim=1).T
    assert torch.equal(m.scores(test).argmax(1), cosine.argmax(1))
    assert m.state_bytes() == 4 * 16 * 4


def test_fecam_is_mahalanobis_with_the_papers_shrinkage():
    m = _method("fecam", shrink1=1.0, shrink2=0.5)
    x, y = _blobs(25, [0, 1, 2])
    m.fit(x, y, [0, 1, 2])
    test, _ = _blobs(8, [0, 1, 2], seed=2)
    tx, ft = F.normalize(test.double().sqrt(), dim=1), x.double().sqrt()
    expected = []
    for c in range(3):
        f = ft[y == c]
        cov = torch.cov(f.T)
        off = cov - torch.diag(torch.diagonal(cov))
        eye = torch.eye(16, dtype=cov.dtype)
        shrunk = cov + 1.0 * torch.diagonal(cov).mean() * eye + 0.5 * (off.sum() / (off != 0).sum()) * (1 - eye)
        sd = torch.diagonal(shrunk).sqrt()
        corr = shrunk / torch.outer(sd, sd)
        d = tx - F.normalize(f.mean(0), dim=0)
        expected.append(-((d @ torch.linalg.inv(corr)) * d).sum(1))
    torch.testing.assert_close(m.scores(test), torch.stack(expected, 1).float(), rtol=1e-3, atol=1e-3)
    assert m.state_bytes() == 3 * (16 * 16 + 16) * 4


def test_gmm_encoder_is_gmms_own_and_shares_its_feature_cache(tmp_path):
    from harness.nn.vlm import EfficientNetTokens
    from harness.params import resolve_params

    enc = build_encoder("gmm", QD20).eval()
    hp, _ = resolve_params(METHODS.get("gmm"), QD20.family)
    gmm_tokens = EfficientNetTokens(QD20.channels, hp["visual_tokens"], hp["image_size"])
    assert isinstance(enc, PooledTokens) and enc.token_encoder.id == gmm_tokens.id == "effnet_lite0-in1k-c1-112px-4tok"
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(enc(x), gmm_tokens.eval()(x).mean(1))
    # A run fills the process-wide cache under GMM's encoder id: GMM's features() reads the same entries.
    _CACHES.clear()
    execute(RunSpec("simplecil", "quickdraw20_2x10", 0, str(tmp_path), max_train_per_class=4, quiet=True, threads=1))
    cache = _CACHES[(gmm_tokens.id, False)]
    assert len(cache) == 20 * 4 + 20 * 20  # every training and test image, each once
    config = json.loads(next(tmp_path.rglob("config.json")).read_text())
    assert config["method_info"]["encoder"] == "effnet_lite0-in1k-c1-112px-4tok-mean"
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["memory_exemplars"] == 0 and summary["memory_bytes"] == 20 * 1280 * 4  # the prototypes


def test_timm_encoder_reads_a_local_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    enc = build_encoder("timm:test_efficientnet", QD20, weights=str(tmp_path / "w.safetensors")).eval()
    assert torch.equal(enc.net.state_dict()["conv_stem.weight"], state["conv_stem.weight"])
    assert enc(torch.rand(2, 1, 28, 28)).shape == (2, enc.out_dim)
    assert enc.id.startswith("timm-test_efficientnet-w")  # the weights' digest is part of the id
    with pytest.raises(HarnessError, match="needs weights"):
        build_encoder("timm:test_efficientnet", QD20)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_vision_tower_from_a_local_folder(tmp_path, family):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config_cls, model_cls = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig,
                                                                                   SiglipVisionModel)}[family]
    config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=8)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path / "tower")
    enc = build_encoder(f"hf:{tmp_path / 'tower'}", QD20).eval()
    out = enc(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    assert enc.id == "hf-tower-32px"


def test_bad_encoder_specs_are_refused_in_one_line():
    with pytest.raises(HarnessError, match="expected gmm, backbone"):
        build_encoder("resnet", QD20)
    with pytest.raises(HarnessError, match="random weights"):
        _method("simplecil", encoder="backbone")


@pytest.mark.parametrize("name", ["simplecil", "ranpac", "fecam"])
def test_yardstick_methods_keep_the_contract_with_first_session_training(name):
    # From scratch: the convnet trains on the first task only, then its features are the run's
    # own; the checkpoint then carries the trained encoder (a resumed run must score the same).
    checks = check_method(name, overrides=[(None, "encoder", "backbone"), (None, "first_session", "train")], epochs=2)
    assert all(c.ok for c in checks), [(c.name, c.detail) for c in checks if not c.ok]
