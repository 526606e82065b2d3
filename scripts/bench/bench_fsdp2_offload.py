"""The peer for full fine-tuning with CPU offload: PyTorch's FSDP2 ``fully_shard`` with ``CPUOffloadPolicy`` on one GPU.

Built the way torchtitan's ``--training.enable_cpu_offload`` builds it: the model on the meta device, ``fully_shard``
on the embedding, on the final norm + output head (not resharded after forward), on every block and then on the root,
``to_empty`` on the CPU and initialised there (N(0, 0.02), norm weights 1, fp32 master weights); bf16 compute via
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; activation checkpointing per block; every weight
trained by ``torch.optim.AdamW`` (torchtitan's default implementation, ``fused``) stepping on the CPU, where the
policy keeps parameters, gradients and optimizer state. Batch 1, one warm-up step then ``--steps`` timed steps per
sequence length; the loss is the repo's chunked cross-entropy, so the (tokens x vocab) logits never exist.

Usage, on the GPU machine (the process group of world size 1 is set up here; torchrun with one process works too)::

    python scripts/bench/bench_fsdp2_offload.py --out /tmp/fsdp2.md --json_out /tmp/fsdp2.json

``--device cpu --preset tiny --seq_lens 64,128 --steps 2`` runs the same code in seconds; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import socket
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from llama_offload.model.args import ModelArgs
from llama_offload.model.presets import PRESETS
from llama_offload.model.transformer import Transformer, TransformerBlock
from llama_offload.train.budget import loss_chunk_tokens
from llama_offload.train.loss import chunked_cross_entropy
from llama_offload.train.paged import rope_table

GiB = 2**30


class CheckpointedBlock(nn.Module):
    """One FSDP unit per block. Its forward is the training path (``forward_causal``): FSDP's hooks fire on a module's
    ``__call__``, so the block's own ``forward`` (the KV-cache path) cannot be the unit's forward. The checkpoint sits
    inside the unit, as torchtitan's (checkpoint_wrapper, then fully_shard): recompute runs on gathered weights."""

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block.forward_causal, x, freqs_cis, use_reentrant=False)


class LossHead(nn.Module):
    """Final norm, output head and chunked loss as one module, so the head's FSDP unit is gathered by its own forward
    (the loss reads ``output.weight`` directly, which no hook would see)."""

    def __init__(self, norm: nn.Module, output: nn.Linear, chunk_tokens: int):
        super().__init__()
        self.norm, self.output, self.chunk_tokens = norm, output, chunk_tokens

    def forward(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(self.norm(h), self.output.weight, targets, chunk_tokens=self.chunk_tokens,
                                     reduction="mean")


class CausalLM(nn.Module):
    """Embedding -> checkpointed blocks -> norm -> loss, over the repo's Transformer's own modules."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings
        self.layers = nn.ModuleList(CheckpointedBlock(b) for b in model.layers)
        self.head = LossHead(model.norm, model.output, loss_chunk_tokens(model.vocab_size))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)  # (1, seq_len, dim) bf16
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return self.head(h, targets)


def init_process_group(device: torch.device) -> None:
    """World size 1 without torchrun. On a GPU the CPU gets a gloo backend too, as torchtitan's enable_cpu_backend:
    collectives on the CPU-resident DTensors (grad-norm clipping) need it."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != 1:
        raise SystemExit("bench_fsdp2_offload measures one GPU: run it with world size 1.")


def build(args: ModelArgs, device: torch.device) -> tuple[CausalLM, Transformer, int, int]:
    """The sharded model with fp32 master weights on the CPU; returns it, the Transformer whose modules it holds (for
    rope_table), its parameters and those outside the embedding (torchtitan's count for FLOPs)."""
    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1)
        lm = CausalLM(model)
    total = sum(p.numel() for p in lm.parameters())
    non_embedding = total - lm.tok_embeddings.weight.numel()
    mesh = init_device_mesh(device.type, (1,))
    cfg: dict[str, Any] = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False))
    # pin_memory (the default) lets the H2D/D2H copies overlap compute; pinning needs CUDA, so a CPU run goes without.
    cfg["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # torchtitan's apply_fsdp order and reshard choices: the head is not resharded after forward (backward needs
    # it at once), the rest is.
    fully_shard(lm.tok_embeddings, **cfg, reshard_after_forward=True)
    fully_shard(lm.head, **cfg, reshard_after_forward=False)
    for layer in lm.layers:
        fully_shard(layer, **cfg, reshard_after_forward=True)
    fully_shard(lm, **cfg)
    lm.to_empty(device="cpu")  # FSDP2 pins each CPU shard as it is materialised here
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p  # world size 1: the local shard is all of it
            local.fill_(1.0) if p.ndim == 1 else local.normal_(0.0, 0.02)  # 1-D params are the RMSNorm weights
    return lm, model, total, non_embedding


def host_gib(field: str = "VmHWM") -> float:
    """Resident host memory from /proc/self/status (VmHWM: the peak so far, monotone over the run)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GiB
    return float("nan")


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 / GiB for line in f if line.startswith("MemAvailable:"))


def train_step(lm: CausalLM, opt: torch.optim.Optimizer, tokens: torch.Tensor, targets: torch.Tensor,
               freqs_cis: torch.Tensor, max_norm: float, sync: Callable[[], None],
               check: bool = False) -> tuple[float, float, float]:
    """One optimizer step; returns (loss, forward+backward seconds, optimizer seconds). FSDP's last backward hook
    waits for the gradients' D2H copies, so the split is clean once the device is synchronised. ``check``: fail
    unless every weight got a gradient (full fine-tuning, and a unit whose hooks never fired would show here)."""
    t0 = time.perf_counter()
    loss = lm(tokens, targets, freqs_cis)
    loss.backward()
    sync()
    t1 = time.perf_counter()
    missing = [n for n, p in lm.named_parameters() if p.grad is None] if check else []
    if missing:
        raise RuntimeError(f"no gradient for {len(missing)} weights, e.g. {missing[0]}")
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(lm.parameters(), max_norm, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return loss.item(), t1 - t0, time.perf_counter() - t1


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:240]}" if text else type(e).__name__


def run_row(lm: CausalLM, model: Transformer, opt: torch.optim.Optimizer, cli: argparse.Namespace, seq_len: int,
            device: torch.device, flops_per_token: Callable[[int], float], note: str) -> dict[str, Any]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    row: dict[str, Any] = dict(seq_len=seq_len, note=note)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        g = torch.Generator().manual_seed(seq_len)
        ids = torch.randint(0, model.vocab_size, (1, seq_len + 1), generator=g).to(device)
        tokens, targets = ids[:, :-1], ids[:, 1:]
        freqs_cis = rope_table(model, seq_len, device)  # (seq_len, head_dim/2) complex64
        # Warm-up: the first one also allocates AdamW's state (on the CPU, beside the fp32 master weights).
        train_step(lm, opt, tokens, targets, freqs_cis, cli.max_norm, sync, check=True)
        steps = [train_step(lm, opt, tokens, targets, freqs_cis, cli.max_norm, sync) for _ in range(cli.steps)]
        step_s = statistics.median(fb + o for _, fb, o in steps)
        tps = seq_len / step_s
        row.update(loss=steps[-1][0], step_s=step_s, fwd_bwd_s=statistics.median(s[1] for s in steps),
                   optim_s=statistics.median(s[2] for s in steps), steps_s=[fb + o for _, fb, o in steps],
                   tokens_per_s=tps, mfu=tps * flops_per_token(seq_len) / (cli.peak_tflops * 1e12))
    except Exception as e:  # noqa: BLE001 - every failure becomes one row, the run goes on
        kind = "OOM" if is_oom(e) else "FAILED"
        row["note"] = f"{kind} at {seq_len} tokens: {one_line(e)}" + (f"; {note}" if note else "")
        for m in lm.modules():  # leave no gathered weights or stray gradients to the next row
            if isinstance(m, FSDPModule):
                m.reshard()
        opt.zero_grad(set_to_none=True)
    finally:
        gc.collect()
        if device.type == "cuda":
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GiB
            torch.cuda.empty_cache()
        row["peak_host_gib"] = host_gib()
    return row


def fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seq_len | tokens/s | step s | fwd+bwd s | optim s | peak GPU GiB | peak host RSS GiB | MFU % | note |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(f"| {r['seq_len']} | {fmt(r.get('tokens_per_s'), '.1f')} | {fmt(r.get('step_s'), '.3f')} | "
                     f"{fmt(r.get('fwd_bwd_s'), '.3f')} | {fmt(r.get('optim_s'), '.3f')} | "
                     f"{fmt(r.get('peak_gpu_gib'), '.2f')} | {fmt(r.get('peak_host_gib'), '.2f')} | {fmt(mfu, '.2f')} | "
                     f"{str(r.get('note', '')).replace('|', '/')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--seq_lens", default="4096,32768,131072")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per seq_len, after one warm-up step")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--optim_impl", default="fused", choices=["fused", "foreach", "for-loop"],
                    help="torch.optim.AdamW implementation; torchtitan's default is fused (on the CPU here)")
    ap.add_argument("--max_norm", type=float, default=0.0,
                    help="grad-norm clipping as torchtitan (its default 1.0); 0, the default, skips it")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (989: H100 SXM)")
    ap.add_argument("--no_host_check", action="store_true",
                    help="try even when 16 bytes/parameter exceed MemAvailable (the kernel may kill the run)")
    ap.add_argument("--out", help="write the markdown here too")
    ap.add_argument("--json_out", help="every figure as JSON")
    cli = ap.parse_args()
    command = "python " + shlex.join(sys.argv)
    seq_lens = [int(s) for s in cli.seq_lens.split(",") if s.strip()]
    device = torch.device(cli.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    init_process_group(device)

    margs = ModelArgs(**PRESETS[cli.preset])
    note = "" if device.type == "cuda" else "CPU run: CPUOffloadPolicy(pin_memory=False), pinning needs CUDA"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    header = {"command": command, "gpu": gpu, "torch": torch.__version__, "preset": cli.preset,
              "optim_impl": cli.optim_impl, "max_norm": cli.max_norm, "peak_tflops": cli.peak_tflops,
              "pin_memory": device.type == "cuda", "batch": 1}
    rows: list[dict[str, Any]] = []
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(margs, model_parallel_size=1).parameters())
    need, avail = 16 * n_params / GiB, mem_available_gib()  # fp32 params + grads + AdamW exp_avg, exp_avg_sq
    header.update(params=n_params, host_state_gib=need, mem_available_gib=avail)
    if need > 0.95 * avail and not cli.no_host_check:
        # The kernel's OOM killer would end the run with no output at all: report every row instead.
        rows = [dict(seq_len=s, note=f"OOM (host) at {s} tokens, not attempted: fp32 weights, grads and AdamW state "
                                     f"need {need:.1f} GiB, {avail:.1f} GiB available") for s in seq_lens]
    else:
        lm, model, total, non_emb = build(margs, device)
        L, H, Q = margs.n_layers, margs.n_heads, margs.head_dim

        def flops_per_token(t: int) -> float:  # torchtitan's get_nparams_and_flops
            return 6 * non_emb + 12 * L * H * Q * t

        impl = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
        opt = torch.optim.AdamW(lm.parameters(), lr=cli.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                **impl[cli.optim_impl])
        header.update(non_embedding_params=non_emb, host_after_build_gib=host_gib("VmRSS"))
        for s in seq_lens:
            rows.append(run_row(lm, model, opt, cli, s, device, flops_per_token, note))
            r = rows[-1]
            done = f"{r['tokens_per_s']:.1f} tokens/s" if r.get("tokens_per_s") else r["note"]
            print(f"[bench_fsdp2_offload] {s} tokens: {done}", file=sys.stderr, flush=True)
    md = (f"`{command}`\n\nFSDP2 fully_shard + CPUOffloadPolicy, preset "
          f"{cli.preset} ({n_params / 1e9:.2f}B params), GPU: {gpu}, torch {torch.__version__}, AdamW "
          f"{cli.optim_impl} on the CPU, batch 1, MFU against {cli.peak_tflops:g} TFLOPS\n\n{table(rows)}\n")
    print(md)
    if cli.out:
        with open(cli.out, "w") as f:
            f.write(md)
    if cli.json_out:
        with open(cli.json_out, "w") as f:
            json.dump(dict(header, rows=rows), f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
