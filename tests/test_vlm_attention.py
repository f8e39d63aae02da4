"""The float32-product attention a bf16 LM runs on a CPU (harness.nn.vlm.attention)."""
import torch
import torch.nn.functional as F
from torch import nn

from harness.nn.vlm import build_stack
from harness.nn.vlm.attention import NAME, fp32_scores_attention


def _module(groups: int) -> nn.Module:
    m = nn.Module()
    m.num_key_value_groups, m.is_causal = groups, True
    return m


def _reference(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def test_grouped_query_attention_equals_sdpa_with_a_cache_offset_and_without_a_mask():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 5, 8, generator=g)  # 6 query heads over 2 key heads, 5 new positions
    k, v = torch.randn(3, 2, 9, 8, generator=g), torch.randn(3, 2, 9, 8, generator=g)  # 4 cached + 5
    causal = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)
    mask = torch.zeros(3, 1, 5, 9).masked_fill(~causal, torch.finfo(torch.float32).min)
    out, _ = fp32_scores_attention(_module(3), q, k, v, mask, scaling=8 ** -0.5)
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    out, _ = fp32_scores_attention(_module(3), q, k, v, None)  # an encoder's full attention
    torch.testing.assert_close(out, _reference(q, k, v, None), atol=1e-5, rtol=1e-5)


def test_bf16_inputs_get_float32_scores_and_come_back_in_bf16():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 7, 16, generator=g) * 3 for _ in range(3))
    out, _ = fp32_scores_attention(_module(1), q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert out.dtype == torch.bfloat16
    exact = _reference(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), None)
    # only the output's rounding to bf16 separates it from float32 attention on the same inputs
    torch.testing.assert_close(out.float(), exact, atol=0, rtol=2 ** -8)


def test_a_bf16_lm_on_cpu_takes_it_and_an_fp32_one_keeps_sdpa():
    torch.manual_seed(0)
    vlm = build_stack("tiny", in_channels=1, visual_tokens=4)
    decoder = vlm.lm.get_decoder()
    assert decoder.config._attn_implementation == "sdpa"
    feats, answers = torch.randn(4, 4, vlm.encoder.out_dim), vlm.answer_ids(["a cat.", "a dog.", "an owl.", "a fig."])
    fp32_loss = vlm.loss(feats, answers)
    vlm.set_lm_dtype(torch.bfloat16)
    assert decoder.config._attn_implementation == NAME
    ours = vlm.loss(feats, answers)
    decoder.set_attn_implementation("sdpa")
    sdpa = vlm.loss(feats, answers)
    # both bf16 paths sit within bf16's rounding of the float32 loss
    assert abs(ours.item() - fp32_loss.item()) < 0.02 * fp32_loss.item()
    assert abs(sdpa.item() - fp32_loss.item()) < 0.02 * fp32_loss.item()
    vlm.set_lm_dtype(torch.float32)
    assert decoder.config._attn_implementation == "sdpa"  # (its weights keep bf16's rounding)
    vlm.set_lm_dtype(torch.bfloat16)
    vlm.generate(feats, max_new_tokens=3)  # the KV-cache path decodes with it
    assert decoder.config._attn_implementation == NAME
    vlm.cpu_bf16_attention = False
    vlm.to("cpu")
    assert decoder.config._attn_implementation == "sdpa"
