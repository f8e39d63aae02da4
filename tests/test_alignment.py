"""GMM's stage-1 alignment (harness/cil/alignment.py) and the zero-shot figure it is judged by."""
import json

import torch

from harness.cil import alignment as A
from harness.data import class_order, load_splits
from harness.protocol import get_protocol
from harness.protocol import Protocol, register_protocol
from harness.registry import BUILTIN_PROTOCOLS, PROTOCOLS, discover
from harness.nn.vlm import build_stack

SETTINGS = A.AlignmentSettings(per_class=2, epochs=2, lr=3e-2, batch_size=32, warmup_steps=2)


def test_alignment_data_holds_no_class_of_any_built_in_quickdraw_protocol():
    discover()
    protocol = get_protocol("quickdraw40_4x10")
    images, names, labels = A.alignment_data(protocol, per_class=3)
    all_names = load_splits(protocol).class_names
    reserved = set()
    assert {"quickdraw20_2x10", "quickdraw100_10x10", "quickdraw_fscil"} <= BUILTIN_PROTOCOLS
    for name in sorted(BUILTIN_PROTOCOLS):
        p = PROTOCOLS.get(name)
        if p.dataset == "quickdraw":
            used = {all_names[c] for c in class_order(p, all_names)}
            assert not used & set(names), name
            reserved |= used
    assert len(names) == 345 - len(reserved) and set(names) | reserved == set(all_names)
    builtin = {all_names[c] for c in class_order(get_protocol("quickdraw100_10x10"), all_names)}
    assert {all_names[c] for c in class_order(get_protocol("quickdraw_fscil"), all_names)} == builtin  # 245 left
    assert images.shape == (len(names) * 3, 1, 28, 28) and torch.bincount(labels).tolist() == [3] * len(names)


def test_a_protocol_a_user_registers_leaves_built_in_alignments_alone():
    discover()
    builtin = get_protocol("quickdraw20_2x10")
    _, before = A.alignment_classes(builtin)
    names = load_splits(builtin).class_names
    extra = [names[c] for c in before[:30]]  # 30 of the classes the built-in protocols align on
    mine = register_protocol(Protocol(name="test_user_quickdraw30", dataset="quickdraw", num_classes=30, num_tasks=3,
                                      increment=10, class_order=extra, image_size=28, channels=1, noun="drawing",
                                      family="quickdraw"))
    try:
        assert A.alignment_classes(builtin)[1] == before  # the same set: the shipped alignment still serves
        _, own = A.alignment_classes(mine)
        assert set(own) == set(before) - {names.index(n) for n in extra}  # its own classes are never aligned on
    finally:
        del PROTOCOLS._items[mine.name]
        PROTOCOLS._sources.pop(mine.name, None)


def _stack():
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.set_question("What is this drawing of?")
    return vlm


def _align(vlm, cache):
    return A.aligned_projection(vlm, get_protocol("quickdraw20_2x10"), vlm.encoder, cache, SETTINGS, quiet=True)


def test_alignment_trains_once_is_cached_and_leaves_the_run_random_state_alone(tmp_path):
    discover()
    first = _stack()
    rng = torch.get_rng_state()
    record = _align(first, tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)
    pool = len(A.alignment_data(get_protocol("quickdraw20_2x10"), 1)[1])  # 245 unless a test registered more
    assert record["built"] and record["classes"] == pool and record["samples"] == 2 * pool
    assert record["final_loss"] < 0.8 * record["first_loss"]  # the answers were learnt
    files = list(tmp_path.glob("align-*.pt"))
    assert len(files) == 1

    again = _stack()  # another run (another seed): same start, read from the cache
    torch.manual_seed(123)
    assert not _align(again, tmp_path)["built"]
    for a, b in zip(first.proj.parameters(), again.proj.parameters()):
        assert torch.equal(a, b)

    files[0].write_bytes(files[0].read_bytes()[:-10])  # damaged: built again, same weights
    third = _stack()
    assert _align(third, tmp_path)["built"]
    assert all(torch.equal(a, b) for a, b in zip(first.proj.parameters(), third.proj.parameters()))


def test_a_bundled_alignment_is_used_before_the_cache(tmp_path):
    discover()
    built = _stack()
    _align(built, tmp_path / "made")
    (tmp_path / "bundled").mkdir()
    for f in (tmp_path / "made").glob("align-*.pt"):
        f.rename(tmp_path / "bundled" / f.name)
    loaded = _stack()
    record = A.aligned_projection(loaded, get_protocol("quickdraw20_2x10"), loaded.encoder, tmp_path / "cache",
                                  SETTINGS, quiet=True, bundled=tmp_path / "bundled")
    assert not record["built"] and record["file"].startswith(str(tmp_path / "bundled"))
    assert not (tmp_path / "cache").exists()
    assert all(torch.equal(a, b) for a, b in zip(built.proj.parameters(), loaded.proj.parameters()))


def test_other_settings_are_another_cache_entry(tmp_path):
    discover()
    _align(_stack(), tmp_path)
    other = A.AlignmentSettings(**{**SETTINGS.__dict__, "lr": 1e-2})
    A.aligned_projection(_stack(), get_protocol("quickdraw20_2x10"), _stack().encoder, tmp_path, other, quiet=True)
    assert len(list(tmp_path.glob("align-*.pt"))) == 2


def test_zero_shot_accuracy_is_recorded_per_task_and_shown_in_the_table(tmp_path, monkeypatch):
    from harness.cli import main

    monkeypatch.setenv("CIL_CACHE", str(tmp_path / "cache"))
    args = ["run", "--methods", "gmm", "finetune", "--protocol", "quickdraw20_2x10", "--epochs", "1",
            "--max-train-per-class", "4", "--set", "gmm.model=tiny", "gmm.max_new_tokens=4", "gmm.align=disjoint",
            "gmm.align_per_class=1", "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    root = tmp_path / "quickdraw20_2x10+maxtrain=4"
    gmm = next(root.glob("gmm*/seed0"))
    summary = json.loads((gmm / "summary.json").read_text())
    zs = summary["zero_shot_accuracy"]
    assert len(zs) == 2 and all(0 <= a <= 100 for a in zs)
    rows = [r for r in (gmm / "metrics.csv").read_text().splitlines() if ",zero_shot," in r]
    assert len(rows) == 2
    config = json.loads((gmm / "config.json").read_text())
    assert config["method_info"]["alignment"]["classes"] == len(A.alignment_data(get_protocol("quickdraw20_2x10"), 1)[1])
    assert "zero_shot_accuracy" not in json.loads((root / "finetune+epochs=1" / "seed0" / "summary.json").read_text())
    table = (root / "table.md").read_text()
    assert "Zero-shot (%)" in table
    finetune_row = next(line for line in table.splitlines() if line.startswith("| finetune"))
    gmm_row = next(line for line in table.splitlines() if line.startswith("| gmm"))
    assert f"{sum(zs) / 2:.1f}" in gmm_row.split("|")[5] and finetune_row.split("|")[5].strip() == "–"
