"""A quantized block's decode step as one native call (cpu_block.py, csrc/cpu_block.cpp) gives the modules' output
and KV cache to fp32 rounding: int4 with and without minimums, int8 in groups and per channel, grouped-query heads,
one and two rows at different positions, one token and a few; and a quantized checkpoint run on the CPU with the
native kernels gives the dequantized model's logits and greedy tokens."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import pytest
import torch

from llama_offload.model import cpu_block
from llama_offload.checkpoint.load import load_model
from llama_offload.kernels.cpu import gemv_available
from llama_offload.model.cpu_linear import set_cpu_kernel
from llama_offload.model.transformer import Transformer, TransformerBlock
from llama_offload.offload.offloaded import offload
from llama_offload.model.quant import LINEAR_NAMES, QuantLinear, QuantSpec
from llama_offload.convert.quantize import quantize_checkpoint
from llama_offload.model.step import attention_mask, make_step

from tiny import tiny_args, tiny_model

needs_block = pytest.mark.skipif(not (gemv_available(verbose=False) and cpu_block.available()),
                                 reason="the native CPU kernels do not build here")
MAX_SEQ, MAX_BATCH = 32, 2

# (bits, group size (None: per output channel), minimums, scale dtype)
FORMATS = {"int4 g32 mins": (4, 32, True, torch.float16), "int4 g32": (4, 32, False, torch.float16),
           "int8 g32": (8, 32, False, torch.float16), "int8 per channel": (8, None, False, torch.float32)}


def random_quant(out_features: int, in_features: int, bits: int, group: Optional[int], mins: bool,
                 dtype: torch.dtype, g: torch.Generator) -> QuantLinear:
    """Random codes in quant.py's layout, scaled so that the block's activations stay of order one."""
    groups = in_features // (group or in_features)
    if bits == 4:
        codes = torch.randint(0, 256, (out_features, in_features // 2), generator=g, dtype=torch.uint8)
    else:
        codes = torch.randint(-127, 128, (out_features, in_features), generator=g).to(torch.int8)
    step = (0.5 if bits == 4 else 0.05) / in_features ** 0.5
    scales = (step * (0.5 + torch.rand(out_features, groups, generator=g))).to(dtype)
    low = (-7.5 * scales.float() * (1 + 0.1 * torch.randn(out_features, groups, generator=g))).to(dtype) if mins else None
    return QuantLinear(codes, scales, low)


def quantized_model(fmt: str) -> Transformer:
    bits, group, mins, dtype = FORMATS[fmt]
    model = tiny_model(tiny_args(n_layers=2, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH))  # 4 heads, 2 kv heads
    g = torch.Generator().manual_seed(1)
    for layer in model.layers:
        for name in LINEAR_NAMES:
            old = layer.get_submodule(name)
            layer.set_submodule(name, random_quant(old.out_features, old.in_features, bits, group, mins, dtype, g))
    model.setup_caches(MAX_BATCH, MAX_SEQ, "cpu", torch.float32)
    return model


def close(ref: torch.Tensor, got: torch.Tensor) -> None:
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-5 * ref.abs().max().item(), (diff, ref.abs().max().item())


@needs_block
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_fused_step_gives_the_modules_output_and_cache(fmt: str) -> None:
    fused = quantized_model(fmt)
    set_cpu_kernel(fused, "gemv")
    assert all(isinstance(layer.host_step, cpu_block.BlockStep) for layer in fused.layers)
    ref = copy.deepcopy(fused)
    assert ref.layers[0].host_step.mats[0] is ref.layers[0].attention.wq  # a copy's step reads the copy's matrices
    set_cpu_kernel(ref, "dequantize")  # Meta's math over the dequantized matrices, module by module
    assert all(layer.host_step is None for layer in ref.layers)
    taken = []

    def counted(host_step: cpu_block.BlockStep):
        def call(*args, **kwargs):
            result = host_step(*args, **kwargs)
            taken.append(result is not None)
            return result
        return call

    for layer in fused.layers:
        layer.host_step = counted(layer.host_step)
    g = torch.Generator().manual_seed(2)
    tokens = lambda bs, n: torch.randint(0, 96, (bs, n), generator=g)  # noqa: E731
    # Rows of different lengths: two prompts (the modules: too long for one call), then steps of both rows at their
    # own positions, of one token, of three (verifying drafts), and of the second row alone.
    steps = [make_step(tokens(1, 7), 0, max_positions=MAX_SEQ), make_step(tokens(1, 5), 0, max_positions=MAX_SEQ, row0=1)]
    steps += [make_step(tokens(2, 1), [7 + i, 5 + i], max_positions=MAX_SEQ) for i in range(3)]
    steps += [make_step(tokens(2, 3), [10, 8], max_positions=MAX_SEQ),
              make_step(tokens(1, 1), [11], max_positions=MAX_SEQ, row0=1)]
    for step in steps:
        close(ref.step(step), fused.step(step))
    assert taken.count(True) == 2 * 5 and taken.count(False) == 2 * 2
    for r, f in zip(ref.layers, fused.layers):
        close(r.attention.cache.k, f.attention.cache.k)
        close(r.attention.cache.v, f.attention.cache.v)


@needs_block
@torch.inference_mode()
def test_the_fused_step_writes_its_result_in_place() -> None:
    model = quantized_model("int4 g32 mins")
    set_cpu_kernel(model, "gemv")
    block: TransformerBlock = model.layers[0]
    step = make_step(torch.zeros(2, 1, dtype=torch.long), [3, 5], max_positions=MAX_SEQ)
    x = torch.randn(2, 1, 64)  # (bs, seqlen, dim)
    freqs_cis = model.freqs_cis[step.input_pos]  # (bs, seqlen, head_dim/2)
    caches = (block.attention.cache.k.clone(), block.attention.cache.v.clone())
    mask = attention_mask(step.input_pos, step.shape.kv_len, x.dtype)  # (bs, 1, seqlen, kv_len)
    expected = block(x, step.shape, step.input_pos, freqs_cis, mask)
    block.attention.cache.k.copy_(caches[0])
    block.attention.cache.v.copy_(caches[1])
    h = x.clone()
    assert block(h, step.shape, step.input_pos, freqs_cis, mask, out=h) is h  # a packed block's call
    assert torch.equal(h, expected)


@pytest.fixture(scope="module")
def q4_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # int4 in groups of 32 with minimums: the layout of GGUF's Q4_1, the default model's blocks.
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "tiny-q4", QuantSpec(4, 32))


@needs_block
def test_a_cpu_run_with_the_fused_blocks_gives_the_dequantized_models_logits_and_greedy_tokens(q4_ckpt: Path) -> None:
    def run(kernel: str) -> list[torch.Tensor]:
        model = load_model(q4_ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False)
        model = offload(model, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, device="cpu", host_kernel=kernel)
        blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
        assert blocks and all((m.host_step is not None) == (kernel == "gemv") for m in blocks)
        g = torch.Generator().manual_seed(3)
        prompt, tokens = torch.randint(0, 512, (MAX_BATCH, 7), generator=g), torch.randint(0, 512, (MAX_BATCH, 4), generator=g)
        out, pos = [model(prompt, 0)], prompt.shape[1]
        for t in tokens.unbind(1):
            out.append(model(t[:, None], pos))
            pos += 1
        return [x[:, -1] for x in out]

    ref, fused = run("dequantize"), run("gemv")
    for r, f in zip(ref, fused):
        diff = (r - f).abs().max().item()
        assert diff <= 1e-5 * r.abs().max().item() + 1e-6, diff
        top2 = r.topk(2, dim=-1).values  # (bs, 2)
        clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
        assert clear.any()  # the check below must have something to check
        assert torch.equal(r.argmax(-1)[clear], f.argmax(-1)[clear])
