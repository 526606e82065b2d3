"""The CPU lane's native attention (csrc/cpu_attention.cpp via cpu_kernels.attend_host): equal to model.attend on
every cache dtype, grouped-query layout, step size, row offset and mask, read from a KV cache's own strided
slices; the blocks of a CPU lane use it on the host and nowhere else."""

from __future__ import annotations

import platform

import pytest
import torch

from llama_offload.kernels import cpu as cpu_kernels, native_build
from llama_offload.kernels.cpu import attend_host, native
from llama_offload.model.cpu_linear import set_cpu_kernel
from llama_offload.model.transformer import attend
from llama_offload.model.step import attention_mask
from tiny import tiny_args, tiny_model

needs_native = pytest.mark.skipif(not cpu_kernels.attention_available(verbose=False),
                                  reason="no C++ compiler here for the native kernels")


def cache_slices(bs: int, kv_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, row0: int = 1):
    """Keys and values as KVCache.update returns them: rows row0.. of a longer cache, the first kv_len positions."""
    k = torch.randn(bs + row0 + 1, kv_len + 40, n_kv_heads, head_dim).to(dtype)
    v = torch.randn(bs + row0 + 1, kv_len + 40, n_kv_heads, head_dim).to(dtype)
    return k[row0 : row0 + bs, :kv_len], v[row0 : row0 + bs, :kv_len]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bs,seqlen,n_heads,n_kv_heads,head_dim", [
    (1, 1, 8, 8, 128),   # a decode step, one key/value head per query head
    (3, 1, 8, 2, 64),    # a batch of rows at unequal positions, grouped queries
    (2, 4, 6, 3, 40),    # drafts verified: several queries a row; a head_dim with a tail past the vectors
])
def test_native_attention_equals_attend(dtype: torch.dtype, bs: int, seqlen: int, n_heads: int, n_kv_heads: int,
                                        head_dim: int) -> None:
    torch.manual_seed(bs * 100 + seqlen)
    kv_len = 64
    keys, values = cache_slices(bs, kv_len, n_kv_heads, head_dim, dtype)
    xq = torch.randn(bs, seqlen, n_heads, head_dim).to(dtype)
    # Row r's tokens sit at positions 5 + 17 r ..: the mask hides every later position of the bucket.
    pos = torch.tensor([[5 + 17 * r + s for s in range(seqlen)] for r in range(bs)])
    mask = attention_mask(pos, kv_len, dtype)
    got = attend_host(xq, keys, values, mask)
    assert got.shape == (bs, seqlen, n_heads * head_dim) and got.dtype == dtype
    want = attend(xq.double(), keys.double(), values.double(), mask.double())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@needs_native
def test_a_broadcast_mask_and_a_fully_visible_cache() -> None:
    torch.manual_seed(1)
    keys, values = cache_slices(2, 48, 4, 32, torch.float32)
    xq = torch.randn(2, 1, 4, 32)
    mask = torch.zeros(1, 1, 1, 48)  # (1, 1, 1, kv_len): every position of every row visible
    want = attend(xq, keys, values, mask.expand(2, 1, 1, 48))
    torch.testing.assert_close(attend_host(xq, keys, values, mask), want, rtol=1e-5, atol=1e-5)


@needs_native
def test_bad_inputs_are_refused() -> None:
    keys, values = cache_slices(1, 16, 2, 32, torch.float32)
    xq = torch.randn(1, 1, 3, 32)  # 3 query heads over 2 key/value heads
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        attend_host(xq, keys, values, torch.zeros(1, 1, 1, 16))
    with pytest.raises(ValueError, match="share one layout"):
        attend_host(torch.randn(1, 1, 2, 32), keys, values.half(), torch.zeros(1, 1, 1, 16))


@needs_native
def test_cpu_lane_blocks_attend_natively_on_the_host_only() -> None:
    model = tiny_model(tiny_args(n_layers=2))
    block = model.layers[1]
    set_cpu_kernel(block, "torch")
    assert block.attention.host_attend is native("attend")  # the operator itself: the cache's layout is known
    assert model.layers[0].attention.host_attend is None  # blocks not on the CPU lane keep model.attend


_CHECK_BUILD = """
import sys, torch
from llama_offload.kernels.cpu import attend_host, attention_available
from llama_offload.model.transformer import attend
from llama_offload.model.step import attention_mask
assert attention_available()
assert torch.ops.llama_offload_cpu_attention.isa() == sys.argv[1], torch.ops.llama_offload_cpu_attention.isa()
torch.manual_seed(0)
for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 1e-5)):
    k = torch.randn(3, 60, 2, 40).to(dtype)
    v = torch.randn(3, 60, 2, 40).to(dtype)
    xq = torch.randn(2, 3, 4, 40).to(dtype)
    mask = attention_mask(torch.tensor([[7, 8, 9], [30, 31, 32]]), 48, dtype)
    got = attend_host(xq, k[1:, :48], v[1:, :48], mask).double()
    want = attend(xq.double(), k[1:, :48].double(), v[1:, :48].double(), mask.double())
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
print("ok")
"""


@pytest.mark.parametrize("flags,isa", [("-mno-avx512f", "avx2"), ("-mno-avx512f -mno-avx2 -mno-fma", "scalar")])
def test_the_avx2_and_plain_builds_equal_attend(flags: str, isa: str, isa_builds) -> None:
    """The same source built without AVX-512 (and without AVX2), in a process of its own (conftest.isa_builds,
    built with ``flags``; it also runs test_cpu_kernels' check, beside the other instruction set's process)."""
    from conftest import ISA_FLAGS

    assert ISA_FLAGS[isa] == flags
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    if isa == "avx2" and " avx2" not in native_build._cpu_flags():
        pytest.skip("this CPU cannot run the AVX2 build")
    if native_build._compiler() is None:
        pytest.skip("no C++ compiler here")
    done = isa_builds(isa, "cpu_attention")
    assert done["error"] is None and done["stdout"].strip() == "ok", done
