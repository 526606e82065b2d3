"""How a block's matrices multiply on the CPU lane: plain 16-bit linears become ``CpuLinear`` over the same
weights, quantized ones take the kernel by name (kernels/cpu.py), and a quantized block can take its whole
decode step in one native call (cpu_block.py)."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from llama_offload.kernels import cpu
from llama_offload.model import cpu_block


class CpuLinear(nn.Linear):
    """``nn.Linear`` (no bias) of a CPU lane block: the same parameter, multiplied by ``cpu_kernel`` while the
    weight is on the host; on a GPU (a large step streams the block there) it is a plain linear."""

    cpu_kernel = "torch"

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "CpuLinear":
        """A CpuLinear sharing ``linear``'s weight Parameter (the pager's pages keep pointing at it)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.register_parameter("bias", None)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (self.cpu_kernel == "gemv" and w.device.type == "cpu" and w.dtype in cpu.GEMV_DTYPES
                and not torch.is_grad_enabled()):
            return cpu.native("linear16")(x, w)  # checked by wrap's caller: the model's own (out, in) weight
        return F.linear(x, w)


def set_cpu_kernel(module: nn.Module, kernel: str) -> None:
    """How the matrices under ``module`` multiply when they run on the CPU: quantized ones (quant.QuantLinear)
    take the kernel by name; plain 16-bit linears become CpuLinear over the same weights. Its attention layers
    attend with the cpu.native kernel on the CPU wherever it is available, whatever ``kernel``. With "gemv", a block
    of quantized matrices takes its decode steps on the host in one cpu.native call (cpu_block.py)."""
    if kernel not in cpu.QUANT_KERNELS:
        raise ValueError(f"internal: unknown CPU kernel {kernel!r}")
    # Loads the cpu.native kernels. Where a cached calibration names them but they no longer build, torch's run.
    use_gemv = kernel == "gemv" and cpu.gemv_available()
    host_attend = cpu.native("attend") if cpu.attention_available() else None  # the host KV cache's layout: unchecked
    fused = use_gemv and cpu_block.available()
    for name, m in list(module.named_modules()):
        if hasattr(m, "host_attend"):  # model.Attention
            m.host_attend = host_attend
        if hasattr(m, "host_step"):  # model.TransformerBlock
            m.host_step = cpu_block.BlockStep(m) if fused and cpu_block.applies(m) else None
        if name and type(m) is nn.Linear and m.bias is None:
            m = CpuLinear.wrap(m)
            module.set_submodule(name, m)
        if isinstance(m, CpuLinear):
            m.cpu_kernel = "gemv" if use_gemv else "torch"
        elif hasattr(m, "cpu_kernel"):  # quant.QuantLinear
            m.cpu_kernel = "dequantize" if kernel == "gemv" and not use_gemv else kernel
