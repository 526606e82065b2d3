"""Model parallelism (torchrun, FairScale's parallel layers, one slice of every block per rank) on the CPU.

Two processes talk over gloo on the loopback interface only. The 1-process model is the reference: the
2-rank logits equal its logits up to summation order (the all-reduce adds the ranks' partial sums).
The GPU section at the end runs scripts/tools/check_model_parallel.py on two GPUs; it is skipped without them:
``python -m pytest -m cuda -s tests/test_model_parallel.py`` on a machine with two GPUs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from llama_offload.model.step import cache_len
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import (
    VOCAB_PARALLEL_MIN_VOCAB, _load_state_dict, load_model, load_state_dict, local_shapes, random_state_dict,
    rank_split_dim, save_checkpoint,
)
from llama_offload.model.transformer import Transformer, check_model_parallel_sizes
from llama_offload.offload.offloaded import offload
from llama_offload.offload.plan import block_bytes, plan_offload
from llama_offload.checkpoint.meta import write_checkpoint_meta
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.quant_load import quantize_state_dict

from conftest import run_in_process

REPO = Path(__file__).resolve().parents[2]
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, rope_theta=1e6)
MAX_SEQ, MAX_BATCH, STEPS = 32, 2, 4
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_llama3_layout(sd: dict[str, torch.Tensor], args: ModelArgs, ckpt: Path, num_shards: int) -> None:
    """A checkpoint whose embedding is split by token, as Llama 3's VocabParallelEmbedding saves it."""
    save_checkpoint(sd, args, ckpt, num_shards=num_shards)
    for i, part in enumerate(sd["tok_embeddings.weight"].chunk(num_shards, dim=0)):
        path = ckpt / f"consolidated.{i:02d}.pth"
        shard = torch.load(path, map_location="cpu", weights_only=True)
        shard["tok_embeddings.weight"] = part.clone()
        torch.save(shard, path)


def rank_slice(full: torch.Tensor, dim, rank: int, world_size: int) -> torch.Tensor:
    if dim is None:
        return full
    size = full.shape[dim] // world_size
    return full.narrow(dim, rank * size, size)


def run_steps(model, prompt: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill, then feed ``tokens`` one step at a time: every step's logits."""
    logits = [model(prompt, 0)]
    pos = prompt.shape[1]
    for t in tokens.unbind(1):
        logits.append(model(t[:, None], pos))
        pos += 1
    return logits


# --- in one process: slicing, layout, sizes, plan ----------------------------------------------------


@pytest.fixture(scope="module")
def args4() -> ModelArgs:
    # Four kv heads, so that 1, 2 and 4 ranks all divide the model.
    return ModelArgs(**{**TINY, "n_kv_heads": 4}, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)


@pytest.fixture(scope="module")
def sd4(args4) -> dict[str, torch.Tensor]:
    return random_state_dict(args4, seed=5)


@pytest.fixture(scope="module")
def ckpts4(tmp_path_factory, args4, sd4) -> dict[tuple[int, str], Path]:
    root = tmp_path_factory.mktemp("slices")
    out = {}
    for m in (1, 2, 4):
        out[m, "llama2"] = root / f"llama2-{m}"
        save_checkpoint(sd4, args4, out[m, "llama2"], num_shards=m)
        if m > 1:
            out[m, "llama3"] = root / f"llama3-{m}"
            save_llama3_layout(sd4, args4, out[m, "llama3"], m)
    return out


@pytest.mark.parametrize("shards, layout", [(1, "llama2"), (2, "llama2"), (4, "llama2"), (2, "llama3"), (4, "llama3")])
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("vocab_parallel", [None, True, False])
def test_each_rank_gets_its_slice_of_every_full_tensor(ckpts4, args4, sd4, shards, layout, world_size, vocab_parallel):
    # With M shards and N ranks: N == M reads shard r, N < M joins shards, N > M cuts one.
    ckpt = ckpts4[shards, layout]
    expected_layout = vocab_parallel if vocab_parallel is not None else (shards > 1 and layout == "llama3")
    for rank in range(world_size):
        got, used = _load_state_dict(ckpt, args4, False, rank, world_size, vocab_parallel)
        assert used == expected_layout
        assert list(got) == list(sd4)
        assert {k: v.shape for k, v in got.items()} == local_shapes(args4, world_size, used)
        for key, full in sd4.items():
            want = full if world_size == 1 else rank_slice(full, rank_split_dim(key, used), rank, world_size)
            assert torch.equal(got[key], want), (key, rank)
            assert got[key].is_contiguous()


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_rank_parts_are_views_of_the_shard_files_where_no_join_is_needed(ckpts4, args4):
    # 2 shards, 2 ranks: every split tensor of rank 1 is shard 01's own bytes, not a copy.
    got = load_state_dict(ckpts4[2, "llama2"], args4, rank=1, world_size=2, show_progress=False)
    ranges = _mapped_ranges((ckpts4[2, "llama2"] / "consolidated.01.pth").resolve())
    assert ranges
    for key in ("layers.0.attention.wq.weight", "layers.1.attention.wo.weight", "output.weight", "tok_embeddings.weight"):
        assert any(lo <= got[key].data_ptr() < hi for lo, hi in ranges), key
    # 1 shard, 2 ranks: a cut along rows (wq) is still a view of the file; a cut along columns (wo) is copied.
    got = load_state_dict(ckpts4[1, "llama2"], args4, rank=1, world_size=2, show_progress=False)
    ranges = _mapped_ranges((ckpts4[1, "llama2"] / "consolidated.00.pth").resolve())
    assert any(lo <= got["layers.0.attention.wq.weight"].data_ptr() < hi for lo, hi in ranges)
    assert not any(lo <= got["layers.0.attention.wo.weight"].data_ptr() < hi for lo, hi in ranges)


def test_embedding_layout_of_a_single_shard_follows_the_vocabulary_size(tmp_path):
    small = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=8, max_batch_size=1)
    big = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=16, max_seq_len=8, max_batch_size=1)
    assert VOCAB_PARALLEL_MIN_VOCAB == 128_000
    for args, vocab_parallel in ((small, False), (big, True)):
        ckpt = tmp_path / str(args.vocab_size)
        save_checkpoint(random_state_dict(args), args, ckpt)
        got, used = _load_state_dict(ckpt, args, False, 1, 2, None)
        assert used is vocab_parallel
        want = (args.vocab_size // 2, 16) if vocab_parallel else (args.vocab_size, 8)
        assert got["tok_embeddings.weight"].shape == want
        # An explicit choice wins.
        assert _load_state_dict(ckpt, args, False, 1, 2, not vocab_parallel)[1] is (not vocab_parallel)


def test_a_process_count_that_does_not_divide_the_heads_is_a_clear_error(ckpts4, args4):
    args = ModelArgs(**TINY, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)  # 4 heads, 2 kv heads
    with pytest.raises(ValueError) as e:
        check_model_parallel_sizes(args, 4)
    msg = str(e.value)
    assert "over 4 processes" in msg and "key/value heads (n_kv_heads) 2" in msg
    assert "Process counts that work for this model: 1, 2." in msg and "--nproc_per_node" in msg
    with pytest.raises(ValueError, match=r"over 3 processes.*this model has n_heads 4, key/value heads "
                                         r"\(n_kv_heads\) 4\. Process counts that work for this model: 1, 2, 4\."):
        load_state_dict(ckpts4[1, "llama2"], args4, rank=0, world_size=3, show_progress=False)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        load_state_dict(ckpts4[1, "llama2"], args4, rank=2, world_size=2, show_progress=False)
    with pytest.raises(RuntimeError, match="model-parallel group of 2"):
        Transformer(args4, model_parallel_size=2)  # no torchrun group in this process


def test_one_process_builds_plain_layers_with_meta_names(args4):
    with torch.device("meta"):
        model = Transformer(args4)
    assert model.model_parallel_size == 1 and not model.vocab_parallel_embedding
    assert type(model.tok_embeddings) is nn.Embedding
    for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3"):
        assert type(model.layers[0].get_submodule(name)) is nn.Linear, name
    assert type(model.output) is nn.Linear
    assert model.layers[0].attention.n_local_heads == 4 and model.layers[0].attention.n_rep == 1


def test_plan_is_per_rank(args4):
    shapes = local_shapes(args4, 2, vocab_parallel_embedding=False)
    block = sum(s.numel() for k, s in shapes.items() if k.startswith("layers.0.")) * 2
    assert block_bytes(args4, torch.float16, 2) == block
    one = plan_offload(args4, torch.float16, max_batch_size=2, max_seq_len=32)
    assert plan_offload(args4, torch.float16, max_batch_size=2, max_seq_len=32, model_parallel_size=1) == one
    two = plan_offload(args4, torch.float16, max_batch_size=2, max_seq_len=32, model_parallel_size=2)
    assert two.block_bytes == block and two.model_parallel_size == 2
    assert two.fixed_bytes["embedding"] == one.fixed_bytes["embedding"] // 2
    assert two.fixed_bytes["KV cache"] == one.fixed_bytes["KV cache"] // 2
    assert "per rank" in two.describe() and "per rank" not in one.describe()


# --- two processes over gloo -------------------------------------------------------------------------


def _worker(rank: int, world_size: int, port: int, job: dict) -> None:
    os.environ.update(LOOPBACK, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from llama_offload.model import parallel
    from llama_offload.generate.generation import Llama

    assert parallel.init_model_parallel() == (rank, world_size)
    out = {}
    for case, spec in job["cases"].items():
        quantize = QuantSpec(**spec["quantize"]) if spec.get("quantize") else None
        model = load_model(spec["ckpt"], max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False,
                           vocab_parallel_embedding=spec["flag"], quantize=quantize)
        modules = dict(model.named_modules())
        result = {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "types": {name: f"{type(modules[name]).__name__}{getattr(modules[name], 'parallel', '') or ''}" for name in (
                "tok_embeddings", "layers.0.attention.wq", "layers.0.attention.wk", "layers.0.attention.wo",
                "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "layers.0.feed_forward.w3", "output")},
            "vocab_parallel": model.vocab_parallel_embedding,
        }
        packed = offload(model, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, device="cpu")
        result["cache"] = tuple(packed.resident[0].block.attention.cache.k.shape)
        result["logits"] = run_steps(packed, job["prompt"], job["tokens"])
        if spec.get("plain"):
            plain = load_model(spec["ckpt"], max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False)
            plain.setup_caches(MAX_BATCH, MAX_SEQ, "cpu", torch.float32)
            result["plain_logits"] = run_steps(plain, job["prompt"], job["tokens"])
        out[case] = result
    gen = job["gen"]
    llama = Llama.build(gen["ckpt"], gen["tokenizer"], max_seq_len=64, max_batch_size=2, device="cpu")
    out["generated"] = llama.generate(gen["prompts"], max_gen_len=10, temperature=0.8, top_p=0.9)[0]
    torch.save(out, Path(job["out"]) / f"rank{rank}.pt")
    parallel.shutdown()


def spawn_two_ranks(job: dict, timeout: float = 120.0) -> None:
    """Run ``_worker`` on 2 ranks; fail (never hang) if they do not finish in ``timeout`` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(2, free_port(), job), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises if a worker raised or died
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank workers did not finish in {timeout:.0f} s (a rank stuck in a collective?)")


CASES = {
    "llama2 layout, 1 shard split over 2 ranks": dict(shards=1, layout="llama2", flag=None, plain=True),
    "llama2 layout, 2 shards on 2 ranks": dict(shards=2, layout="llama2", flag=None),
    "llama2 layout, 4 shards merged to 2 ranks": dict(shards=4, layout="llama2", flag=None),
    "llama3 layout (flag), 1 shard split over 2 ranks": dict(shards=1, layout="llama2", flag=True),
    "llama3 layout (shards), 4 shards merged to 2 ranks": dict(shards=4, layout="llama3", flag=None),
}


# Quantized models split over 2 ranks: each rank pages its part of the codes, in whole groups (reference: the same
# quantized model in one process).
QUANT_CASES = {
    "int4 g32 checkpoint, split over 2 ranks": dict(ckpt="int4-g32", quantize=None),
    "int8 checkpoint (a scale per output channel), split over 2 ranks": dict(ckpt="int8", quantize=None),
    "--quantize int4 g32 while loading, split over 2 ranks": dict(ckpt="llama2-1", quantize=dict(bits=4, group_size=32),
                                                                  reference="int4-g32"),
}


def save_quantized(sd: dict, args: ModelArgs, ckpt: Path, spec: QuantSpec, tokenizer: Path) -> None:
    """A quantized checkpoint as llama-offload quantize writes it: one shard, the record in llama_offload.json."""
    ckpt.mkdir(parents=True)
    shutil.copy(tokenizer, ckpt / "tokenizer.model")
    (ckpt / "params.json").write_text(json.dumps(args.to_params()))
    torch.save(quantize_state_dict(sd, args, spec, show_progress=False), ckpt / "consolidated.00.pth")
    write_checkpoint_meta(ckpt, chat_format=None, tokenizer="tokenizer.model", source={"format": "test"},
                          quantization=spec.to_json())


def one_process_logits(ckpt: Path, prompt: torch.Tensor, tokens: torch.Tensor, quantize=None) -> list[torch.Tensor]:
    model = load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False, quantize=quantize)
    return run_steps(offload(model, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, device="cpu"), prompt, tokens)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, sp_tokenizer_path) -> dict:
    root = tmp_path_factory.mktemp("model_parallel")
    args = ModelArgs(**TINY, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)
    sd = random_state_dict(args, seed=3, std=0.1)  # std 0.1: logits of order 1, so atol 1e-5 means something
    cases = {}
    for case, spec in CASES.items():
        ckpt = root / f"{spec['layout']}-{spec['shards']}"
        if not ckpt.exists():
            if spec["layout"] == "llama3":
                save_llama3_layout(sd, args, ckpt, spec["shards"])
            else:
                save_checkpoint(sd, args, ckpt, num_shards=spec["shards"])
        cases[case] = dict(ckpt=str(ckpt), flag=spec["flag"], plain=spec.get("plain", False))

    # The reference: one process, the packed blocks on the CPU, greedy tokens.
    reference = offload(load_model(root / "llama2-1", max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH,
                                   show_progress=False), max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, device="cpu")
    prompt = torch.randint(0, args.vocab_size, (MAX_BATCH, 9), generator=torch.Generator().manual_seed(0))
    logits = [reference(prompt, 0)]
    tokens, pos = [], prompt.shape[1]
    for _ in range(STEPS):
        tokens.append(logits[-1][:, -1].argmax(-1))
        logits.append(reference(tokens[-1][:, None], pos))
        pos += 1

    # Sampling through Llama.build with the tokenizer's vocabulary: every rank must draw the same tokens.
    gen_args = ModelArgs(**{**TINY, "vocab_size": 512})
    save_checkpoint(random_state_dict(gen_args, seed=4, std=0.1), gen_args, root / "gen")
    from llama_offload.generate.generation import Llama

    prompts = [[1, 5, 9, 20], [1, 7]]
    llama = Llama.build(root / "gen", sp_tokenizer_path, max_seq_len=64, max_batch_size=2, device="cpu")
    generated = llama.generate(prompts, max_gen_len=10, temperature=0.8, top_p=0.9)[0]

    quant_refs = {}
    for name, spec in (("int4-g32", QuantSpec(4, 32)), ("int8", QuantSpec(8))):
        save_quantized(sd, args, root / name, spec, sp_tokenizer_path)
    for case, spec in QUANT_CASES.items():
        cases[case] = dict(ckpt=str(root / spec["ckpt"]), flag=None, quantize=spec["quantize"])
        ref_ckpt = root / spec.get("reference", spec["ckpt"])
        quant_refs[case] = one_process_logits(ref_ckpt, prompt, torch.stack(tokens, 1))

    job = dict(cases=cases, prompt=prompt, tokens=torch.stack(tokens, 1), out=str(root),
               gen=dict(ckpt=str(root / "gen"), tokenizer=str(sp_tokenizer_path), prompts=prompts))
    start = time.perf_counter()
    spawn_two_ranks(job)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return dict(args=args, sd=sd, logits=logits, tokens=job["tokens"], ranks=ranks, generated=generated,
                seconds=time.perf_counter() - start, quant_refs=quant_refs)


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_models_split_over_two_ranks_give_the_one_process_logits(two_ranks, case):
    r0, r1 = (r[case] for r in two_ranks["ranks"])
    ref = two_ranks["quant_refs"][case]
    for step, (a, b, want) in enumerate(zip(r0["logits"], r1["logits"], ref)):
        assert torch.equal(a, b), step
        assert torch.allclose(a, want, rtol=1e-5, atol=1e-5), (step, (a - want).abs().max().item())
    assert r0["types"]["layers.0.attention.wq"] == "QuantLinearcolumn"
    assert r0["types"]["layers.0.feed_forward.w2"] == "QuantLinearrow"
    assert r0["types"]["output"] == "ColumnParallelLinear"  # the head keeps 16 bits here
    # Each rank holds half of every split matrix's codes, in whole groups.
    w2 = r0["state"]["layers.0.feed_forward.w2.weight"]
    assert w2.shape[1] * (2 if w2.dtype == torch.uint8 else 1) == two_ranks["args"].ffn_hidden_dim // 2


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_one_process_logits(two_ranks, case):
    r0, r1 = (r[case] for r in two_ranks["ranks"])
    ref = two_ranks["logits"]
    assert len(r0["logits"]) == len(ref) == STEPS + 1
    for step, (a, b, want) in enumerate(zip(r0["logits"], r1["logits"], ref)):
        assert torch.equal(a, b), step  # every rank holds the same gathered logits
        assert torch.allclose(a, want, rtol=1e-5, atol=1e-5), (step, (a - want).abs().max().item())
        assert want.abs().max() > 0.3  # not trivially small
    # Greedy decoding would pick the same tokens as the reference did.
    greedy = torch.stack([lg[:, -1].argmax(-1) for lg in r0["logits"][:-1]], 1)
    assert torch.equal(greedy, two_ranks["tokens"])
    if "plain_logits" in r0:  # the packed blocks and the plain model are the same computation
        assert all(torch.equal(a, b) for a, b in zip(r0["plain_logits"], r0["logits"]))


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_its_slice_in_fairscale_layers(two_ranks, case):
    args, sd = two_ranks["args"], two_ranks["sd"]
    vocab_parallel = CASES[case]["flag"] or CASES[case]["layout"] == "llama3"
    for rank, result in enumerate(r[case] for r in two_ranks["ranks"]):
        assert result["vocab_parallel"] == vocab_parallel
        assert list(result["state"]) == list(sd)  # the parameter names are Meta's
        for key, full in sd.items():
            assert torch.equal(result["state"][key], rank_slice(full, rank_split_dim(key, vocab_parallel), rank, 2)), key
        types = result["types"]
        assert types["tok_embeddings"] == ("VocabParallelEmbedding" if vocab_parallel else "ParallelEmbedding")
        for name in ("layers.0.attention.wq", "layers.0.attention.wk", "layers.0.feed_forward.w1",
                     "layers.0.feed_forward.w3", "output"):
            assert types[name] == "ColumnParallelLinear", name
        assert types["layers.0.attention.wo"] == types["layers.0.feed_forward.w2"] == "RowParallelLinear"
        assert result["cache"] == (MAX_BATCH, cache_len(MAX_SEQ), args.kv_heads // 2, args.head_dim)  # this rank's kv heads


def test_every_rank_samples_the_same_tokens_as_one_process(two_ranks):
    r0, r1 = (r["generated"] for r in two_ranks["ranks"])
    assert r0 == r1 == two_ranks["generated"]
    assert any(len(t) > 0 for t in r0)
    print(f"\n2-rank spawn: {two_ranks['seconds']:.1f} s")


def test_fairscale_parallel_layers_are_the_ones_used():
    from fairscale.nn.model_parallel import layers

    from llama_offload.model import parallel

    for ours, theirs in ((parallel.ColumnParallelLinear, layers.ColumnParallelLinear),
                         (parallel.RowParallelLinear, layers.RowParallelLinear),
                         (parallel.ParallelEmbedding, layers.ParallelEmbedding),
                         (parallel.VocabParallelEmbedding, layers.VocabParallelEmbedding)):
        assert issubclass(ours, theirs) and ours.forward is theirs.forward


# --- torchrun, end to end ----------------------------------------------------------------------------


def torchrun(*args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(LOOPBACK)
    env.pop("LLAMA_OFFLOAD_TRACEBACK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def script_ckpt(tmp_path_factory, sp_tokenizer_path) -> tuple[Path, Path]:
    args = ModelArgs(**{**TINY, "vocab_size": 512})
    ckpt = tmp_path_factory.mktemp("script") / "tiny"
    save_checkpoint(random_state_dict(args, seed=6, std=0.1), args, ckpt, num_shards=2)
    return ckpt, sp_tokenizer_path


def test_text_script_under_torchrun_prints_once_what_one_process_prints(script_ckpt):
    ckpt, tokenizer = script_ckpt
    flags = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer), "--prompts",
             '["Once upon a time", "The sea is"]', "--max_gen_len", "8", "--temperature", "0"]
    script = str(REPO / "scripts" / "example_text_completion.py")
    two = torchrun(script, *flags)
    # One process: the script as __main__ in this one (conftest.run_in_process), on the CPU as the ranks are.
    one = run_in_process(*flags, "--device", "cpu", script=Path(script))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    strip = lambda out: re.sub(r".*tokens/s.*\n", "", out)  # noqa: E731  (timings differ)
    assert strip(two.stdout) == strip(one.stdout)
    assert two.stdout.count("Once upon a time") == 1  # only rank 0 prints
    assert "model parallelism over 2 processes" in two.stderr


def test_check_script_tiny_on_cpu(tmp_path):
    r = torchrun(str(REPO / "scripts" / "tools" / "check_model_parallel.py"), "--shape", "tiny", "--steps", "4",
                 "--ckpt_dir", str(tmp_path / "tiny"), "--num_shards", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: offloading changes nothing" in r.stdout
    rows = {line[:34].strip(): line[34:].split() for line in r.stdout.splitlines() if "rank" in line[:34]}
    assert rows["1 rank, offloaded"][:2] == ["0", "5/5"]
    assert rows["2 ranks, offloaded"][1] == "5/5"


def test_a_failing_rank_ends_the_run_instead_of_hanging(tmp_path):
    start = time.perf_counter()
    r = torchrun(str(REPO / "scripts" / "tools" / "check_model_parallel.py"), "--shape", "tiny", "--steps", "2",
                 "--ckpt_dir", str(tmp_path / "tiny"), "--fail_rank", "1", timeout=90)
    assert r.returncode != 0
    assert "[rank 1] check_model_parallel.py: error: rank 1 fails on purpose" in r.stderr
    assert "OK:" not in r.stdout
    assert time.perf_counter() - start < 60


def test_several_processes_without_torchrun_are_refused(script_ckpt):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "example_text_completion.py"), "--ckpt_dir",
                        str(script_ckpt[0]), "--tokenizer_path", str(script_ckpt[1])],
                       capture_output=True, text=True, cwd=REPO, timeout=60,
                       env=dict(env, WORLD_SIZE="2", RANK="1", CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "[rank 1]" in r.stderr and "MASTER_ADDR, MASTER_PORT are not set" in r.stderr
    assert "torchrun --nproc_per_node 2" in r.stderr


# --- two GPUs ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("shape, timeout", [("tiny", 300), ("7b", 1500)])
def test_check_script_on_two_gpus(shape, timeout, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "CUDA_VISIBLE_DEVICES")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / "scripts" / "tools" / "check_model_parallel.py"),
           "--shape", shape, "--ckpt_dir", str(tmp_path / shape)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: offloading changes nothing" in r.stdout


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_text_script_on_two_gpus_prints_what_one_gpu_prints(script_ckpt):
    ckpt, tokenizer = script_ckpt
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "CUDA_VISIBLE_DEVICES")}
    script = str(REPO / "scripts" / "example_text_completion.py")
    flags = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer), "--prompts",
             '["Once upon a time", "The sea is"]', "--max_gen_len", "8", "--temperature", "0"]
    one = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *flags],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    strip = lambda out: re.sub(r".*tokens/s.*\n", "", out)  # noqa: E731
    assert strip(two.stdout) == strip(one.stdout)
    assert "model parallelism over 2 processes (cpu:gloo,cuda:nccl, one GPU per process)" in two.stderr
