"""Int8 decoder weights: per-channel scales, kernels agreeing with each other, logits close to fp32.

Tolerances, on the tiny random model (6 layers of weights with std 0.15, so errors compound more than
in a trained model): weight-only int8 logits within 6% relative L2 error of fp32 and the same argmax at
>= 90% of teacher-forced positions; int8-dynamic (int8 activations too) within 20% and >= 65%.
"""

from __future__ import annotations

import copy

import pytest
import torch

from openmedgemma import MedGemma
from openmedgemma.engine import Engine, GenerationConfig, Int8Linear, generate_ids, quantize
from openmedgemma.engine.quant import quantize_weight, quantized_head
from openmedgemma.errors import OpenMedGemmaError


def test_weights_are_int8_with_one_scale_per_output_channel():
    w = torch.randn(48, 32) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert (q.abs().amax(1) == 127).all()  # every row uses its full range
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # rounding error at most half a step of its own row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1, 1), (2, 3), (3, 5)])  # decode-sized inputs use the fused kernel
def test_int8_kernels_equal_the_dequantized_weight(dtype, rows):
    w = torch.randn(40, 64)
    layer = Int8Linear(w.to(dtype))
    x = torch.randn(*rows, 64, dtype=dtype)
    out = layer(x)
    assert out.shape == (*rows, 40) and out.dtype == dtype
    q, scale = quantize_weight(w.to(dtype))
    ref = (x.double() @ (q.double() * scale.to(dtype).double()[:, None]).T).to(dtype)
    # the decode kernel rounds x to int16 (error <= sum_k |w_k| * max|x| / 65534: at most ~2e-3 here); prefill fp32
    decode_tol = dict(atol=2e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(out, ref, **decode_tol)
    torch.testing.assert_close(layer.dequant_matmul(x.reshape(-1, 64)).reshape(out.shape), ref, **tol)


def _logits(model, ids, head=None):
    with torch.no_grad():
        return (head or model.logits)(model.hidden_states(ids))


@pytest.mark.parametrize(("mode", "max_rel", "min_agree"), [("int8", 0.06, 0.9), ("int8-dynamic", 0.2, 0.65)])
def test_int8_logits_close_to_fp32(ours_text, mode, max_rel, min_agree):
    ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = _logits(ours_text, ids)
    model = copy.deepcopy(ours_text)
    quantize(model, mode)
    n_int8 = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert n_int8 == 7 * model.config.text.num_hidden_layers
    for out in (_logits(model, ids), _logits(model, ids, quantized_head(model, mode))):
        rel = float((out - ref).norm() / ref.norm())
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        assert 0 < rel < max_rel and agree >= min_agree, (rel, agree)


def test_int8_greedy_mostly_agrees_and_runs_through_the_engine(engine, ours_text):
    prompt = torch.randint(3, 90, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    fp32 = generate_ids(ours_text, [prompt], None, GenerationConfig(max_new_tokens=24))[0]
    model = copy.deepcopy(ours_text)
    quantize(model, "int8")
    int8 = generate_ids(model, [prompt], None, GenerationConfig(max_new_tokens=24))[0]
    first_difference = next((i for i, (a, b) in enumerate(zip(fp32, int8)) if a != b), len(fp32))
    assert first_difference >= 8  # random tiny models have small margins; the first tokens must agree

    mm = copy.deepcopy(engine.model)
    weights_before = sum(p.numel() * p.element_size() for p in mm.language_model.layers.parameters())
    quantized = Engine(mm, engine.tokenizer, quantize="int8")
    int8_bytes = sum(b.numel() * b.element_size() for b in mm.language_model.layers.buffers())
    assert int8_bytes < 0.3 * weights_before
    assert not any(isinstance(m, Int8Linear) for m in mm.vision_tower.modules())
    answer = quantized.generate([[{"role": "user", "content": "Hello"}]], GenerationConfig(max_new_tokens=5))[0]
    assert answer.new_tokens > 0


def test_unknown_quantization_is_refused(ours_text):
    with pytest.raises(OpenMedGemmaError, match="unknown quantization 'int3'"):
        quantize(copy.deepcopy(ours_text), "int3")


def test_quantize_releases_the_checkpoint_mapping_of_what_it_replaced(hf_text):
    """Loaded weights are views of each file's mapping; once the linears are quantized, what stays of a layer
    (its norms) must not keep a whole shard mapped and resident (the 4b shape held 7.8 GB of bf16 pages)."""
    model = MedGemma.from_pretrained(hf_text[1])
    lm = model.language_model
    mapped = lm.layers[0].input_layernorm.weight.untyped_storage().nbytes()
    assert mapped > lm.layers[0].input_layernorm.weight.numel() * 4  # before: a view of the file
    quantize(model, "int8")
    for layer in [*lm.layers, lm.norm]:
        for param in layer.parameters():
            assert param.untyped_storage().nbytes() == param.numel() * param.element_size()
