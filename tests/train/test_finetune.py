"""Fine-tuning on the CPU: the paged schedule equals plain autograd, resume equals an uninterrupted run, data
parallel equals one process with the doubled batch, a tiny model learns a text, and every bad input is refused
before the weights are read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_offload.model.args import ModelArgs
from llama_offload.train import budget, paged
from llama_offload.checkpoint import adapter
from llama_offload.model import lora
from llama_offload.train.finetune import FinetuneOptions, finetune
from llama_offload.train.schedule import step_rows
from llama_offload.train.loss import chunked_cross_entropy
from launch import torchrun
from texts import TEXT
from tiny import tiny_args, tiny_model

REPO = Path(__file__).resolve().parents[2]


def _adapted(dtype: torch.dtype, targets=lora.TARGETS, seed: int = 1):
    model = tiny_model(tiny_args(), dtype=dtype)
    torch.manual_seed(seed)
    adapter = lora.LoRAAdapter(lora.LoRAConfig(4, 8.0, tuple(targets), lora.ModelShape.of(model.params))).to(dtype)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)  # B starts at zero: nonzero B makes every pair's gradient reach the loss
    lora.attach(model, adapter)
    return model, adapter


def _plain_loss_fn(h, weight, targets, reduction):
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction=reduction)


def _batch(seqlen: int = 12):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 96, (2, seqlen), generator=g)
    targets = torch.randint(0, 96, (2, seqlen), generator=g)
    targets[0, :4] = -100  # a prompt part that is not learned
    return tokens, targets


def _one_step(dtype, loss_fn, *, reference: bool):
    model, adapter = _adapted(dtype)
    tokens, targets = _batch()
    freqs = paged.rope_table(model, tokens.shape[1], torch.device("cpu"))
    count = int((targets != -100).sum())
    if reference:
        loss = paged.plain_loss(model, tokens, targets, freqs)
        (loss / count).backward()
    else:
        runner = paged.BlockRunner(model.layers, torch.device("cpu"))
        loss = paged.paged_loss_and_backward(model, runner, tokens, targets, freqs, count, loss_fn)
    return loss.detach(), [p.grad.clone() for p in adapter.parameters()]


def test_block_by_block_step_equals_plain_autograd_bit_for_bit():
    # Same loss function on both sides: the recomputed blocks and the hand-driven backward give the same bits.
    loss_ref, grads_ref = _one_step(torch.float32, None, reference=True)
    loss, grads = _one_step(torch.float32, _plain_loss_fn, reference=False)
    assert torch.equal(loss, loss_ref)
    assert len(grads) == 3 * 7 * 2 and all(g.abs().sum() > 0 for g in grads)
    for g, r in zip(grads, grads_ref):
        assert torch.equal(g, r)


def test_block_by_block_step_with_chunked_loss_equals_plain_autograd():
    chunked = lambda h, w, t, reduction: chunked_cross_entropy(h, w, t, chunk_tokens=5, reduction=reduction)
    loss_ref, grads_ref = _one_step(torch.float64, None, reference=True)
    loss, grads = _one_step(torch.float64, chunked, reference=False)
    # The reference rounds its logits to fp32 (as the model's head does); the chunked loss keeps fp64.
    torch.testing.assert_close(loss.double(), loss_ref.double(), rtol=1e-6, atol=0)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_causal_training_forward_equals_inference_logits():
    model = tiny_model(tiny_args(), dtype=torch.float32)
    tokens, _ = _batch()
    model.setup_caches(2, 64, "cpu", torch.float32)
    expected = model(tokens)
    freqs = paged.rope_table(model, tokens.shape[1], torch.device("cpu"))
    with torch.no_grad():
        h = model.tok_embeddings(tokens)
        for layer in model.layers:
            h = layer.forward_causal(h, freqs)
        got = model.output(model.norm(h)).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_new_adapter_leaves_the_model_unchanged_and_pairs_are_not_block_parameters():
    model = tiny_model(tiny_args(), dtype=torch.float32)
    tokens, _ = _batch()
    model.setup_caches(2, 64, "cpu", torch.float32)
    before = model(tokens)
    block_params = sum(p.numel() for p in model.layers[0].parameters())
    adapter = lora.LoRAAdapter(lora.LoRAConfig(4, 8.0, lora.TARGETS, lora.ModelShape.of(model.params)))
    lora.attach(model, adapter)
    assert torch.equal(model(tokens), before)
    # The pager copies a block's parameters into pinned pages: the adapter's must stay out of them.
    assert sum(p.numel() for p in model.layers[0].parameters()) == block_params
    assert not any(p.requires_grad for p in model.parameters())


def test_training_plan_keeps_what_fits_and_refuses_a_budget_below_one_block():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=4096)
    block = 202 * 1024**2 * 2
    kw = dict(block_bytes=block, fixed_weight_bytes=2 * 32000 * 4096 * 2, lora_params=40_000_000, seq_len=4096,
              batch_size=1, itemsize=2, lora_rank=16, offload_activations=True)
    assert budget.plan_training(args, gpu_memory_gb=None, **kw).resident_layers == 0
    small, large = budget.plan_training(args, gpu_memory_gb=8, **kw), budget.plan_training(args, gpu_memory_gb=16, **kw)
    assert 0 < small.resident_layers < large.resident_layers < 32
    assert small.expected_peak_bytes <= 8 * 1024**3 < small.expected_peak_bytes + block
    assert budget.plan_training(args, gpu_memory_gb=80, **kw).resident_layers == 32
    with pytest.raises(ValueError, match=r"too small to train one block at --seq_len 4096"):
        budget.plan_training(args, gpu_memory_gb=2, **kw)
    assert budget.loss_chunk_tokens(128256) == 523


def test_step_rows_are_a_fixed_permutation_per_epoch():
    rows = torch.cat([step_rows(s, 3, 7, seed=5) for s in range(7)])  # 21 rows: three epochs of 7
    for epoch in range(3):
        assert sorted(rows[7 * epoch : 7 * epoch + 7].tolist()) == list(range(7))
    assert torch.equal(step_rows(4, 3, 7, seed=5), rows[12:15])


# --- the whole command ----------------------------------------------------------------------------------


def _opts(tiny_ckpt: Path, data_path: Path, out: Path, **kw) -> FinetuneOptions:
    base = dict(data=str(data_path), out=str(out), ckpt_dir=str(tiny_ckpt), tokenizer_path=str(tiny_ckpt.parent / "tokenizer.model"),
                seq_len=16, lora_rank=4, lr=1e-2, device="cpu")
    base.update(kw)
    return FinetuneOptions(**base)


def _state(out: Path) -> dict:
    return torch.load(out / adapter.STATE_FILE, weights_only=False)


def test_resume_equals_the_uninterrupted_run(tiny_ckpt, text_data, tmp_path):
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "whole", steps=6, batch_size=2, eval_data=str(text_data),
                   eval_every=2), show_progress=False)
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "parts", steps=3, batch_size=2, eval_data=str(text_data),
                   eval_every=2), show_progress=False)
    assert _state(tmp_path / "parts")["step"] == 3
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "parts", steps=6, batch_size=2, eval_data=str(text_data),
                   eval_every=2, resume=True), show_progress=False)
    whole, parts = _state(tmp_path / "whole"), _state(tmp_path / "parts")
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    # Step 3 ends the first part, so that run evaluated there; the whole run did not.
    assert [r["loss"] for r in whole["history"]] == [r["loss"] for r in parts["history"]]
    assert strip(whole["history"])[3:] == strip(parts["history"])[3:]
    assert len(whole["history"]) == 6 and whole["history"][-1]["loss"] < whole["history"][0]["loss"]
    for name, t in whole["adapter"].items():
        assert torch.equal(t, parts["adapter"][name]), name


def test_an_interrupted_run_saves_and_resumes_where_it_stopped(tiny_ckpt, text_data, tmp_path, monkeypatch):
    from llama_offload.train import finetune as ft

    finetune(_opts(tiny_ckpt, text_data, tmp_path / "whole", steps=4), show_progress=False)
    real = ft.Trainer.train_step

    def stop_at_two(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(ft.Trainer, "train_step", stop_at_two)
    with pytest.raises(KeyboardInterrupt):
        finetune(_opts(tiny_ckpt, text_data, tmp_path / "cut", steps=4), show_progress=False)
    assert _state(tmp_path / "cut")["step"] == 2
    monkeypatch.setattr(ft.Trainer, "train_step", real)
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "cut", steps=4, resume=True), show_progress=False)
    assert [r["loss"] for r in _state(tmp_path / "whole")["history"]] == [r["loss"] for r in _state(tmp_path / "cut")["history"]]


def test_two_process_data_parallel_equals_one_process_with_the_doubled_batch(tiny_ckpt, text_data, tmp_path):
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "one", steps=3, batch_size=2), show_progress=False)
    run = torchrun(2, [str(REPO / "scripts" / "finetune.py"), "--data", str(text_data), "--out", str(tmp_path / "two"),
           "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", str(tiny_ckpt.parent / "tokenizer.model"),
           "--seq_len", "16", "--lora_rank", "4", "--lr", "0.01", "--device", "cpu", "--steps", "3", "--batch_size", "1"])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert two["world_size"] == 2
    for a, b in zip(one["history"], two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, t in one["adapter"].items():
        torch.testing.assert_close(two["adapter"][name], t, rtol=1e-4, atol=1e-5)  # Adam amplifies rounding in near-zero gradients


def test_errors_are_refused_before_the_weights_are_read(tiny_ckpt, text_data, tmp_path, monkeypatch):
    from llama_offload.train import finetune as ft

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(ft, "load_model", no_load)
    out = tmp_path / "out"
    cases = [
        (dict(lora_targets="wq,wz"), ValueError, r"--lora_targets .* found wz"),
        (dict(steps=2, epochs=1), ValueError, r"--steps or --epochs, not both"),
        (dict(lora_rank=0), ValueError, r"--lora_rank must be a whole number >= 1"),
        (dict(data=str(tmp_path / "missing.jsonl")), FileNotFoundError, r"missing.jsonl does not exist"),
        (dict(resume=True), FileNotFoundError, r"holds no saved run"),
    ]
    short = tmp_path / "short"  # the same model, trained for 64 positions as its params.json records
    shutil.copytree(tiny_ckpt, short)
    params = json.loads((short / "params.json").read_text())
    (short / "params.json").write_text(json.dumps({**params, "max_seq_len": 64}))
    cases.append((dict(ckpt_dir=str(short), seq_len=128), ValueError,
                   r"--seq_len 128 is above the 64 tokens this model was trained for"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases.append((dict(data=str(empty)), ValueError, r"empty.jsonl.*no examples"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    cases.append((dict(data=str(bad)), ValueError, r"bad.jsonl.*line 2"))
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            finetune(_opts(tiny_ckpt, text_data, out, **{"steps": 1, **kw}), show_progress=False)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; nothing in it is overwritten"):
        finetune(_opts(tiny_ckpt, text_data, out, steps=1), show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_out_is_checked_for_writing_and_room_before_the_weights_are_read(tiny_ckpt, text_data, tmp_path, monkeypatch):
    from llama_offload.train import finetune as ft

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(ft, "load_model", no_load)
    opts = _opts(tiny_ckpt, text_data, tmp_path / "runs" / "out", steps=1)
    config = lora.LoRAConfig(4, 32.0, lora.TARGETS, lora.ModelShape.of(ModelArgs.from_json(tiny_ckpt / "params.json")))
    one = adapter.save_bytes(config)
    # The estimate covers what a save really writes (the adapter, its config and the trainer state).
    assert one >= 4 * 3 * sum(4 * (o + i) for o, i in (config.shape.matrix(t) for t in lora.TARGETS)) * 2
    real = shutil.disk_usage
    monkeypatch.setattr(ft.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * one - 1))
    with pytest.raises(OSError, match=r"Not enough free disk space for --out .* need about .* MiB, and the disk of"):
        finetune(opts, show_progress=False)
    monkeypatch.setattr(ft.shutil, "disk_usage", real)
    def read_only(parent, name, kind="partial"):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(ft, "new_temp_dir", read_only)  # files.cleanup's, as finetune imports it
    with pytest.raises(PermissionError, match=r"--out .* cannot be written: .* is not writable \(Read-only file system\)"):
        finetune(opts, show_progress=False)
    assert not (tmp_path / "runs").exists()  # nothing was made on the way


def _temp_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_debris(tiny_ckpt, text_data, tmp_path, monkeypatch,
                                                                     capsys):
    """ENOSPC in the middle of the final save (simulated in-process): the command prints one line and exits 1,
    the step-2 save stays whole and loadable, and no temporary directory remains."""
    import errno

    from llama_offload.cli import main as cli
    from llama_offload.files.cleanup import _host

    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = [tmp_path / f".run.partial-{_host()}-{int(dead.stdout)}-0123abcd", tmp_path / f".run.tmp-{int(dead.stdout)}"]
    for d in debris:  # what killed runs (this version's and earlier ones') left beside --out
        d.mkdir()
        (d / "adapter.safetensors").write_bytes(b"half")
    real_save = torch.save
    saves = []

    def save_then_full(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 2:
            Path(f).write_bytes(b"x" * 100)  # part of the file was written when the disk filled
            raise RuntimeError(f"[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: "
                               f"{os.strerror(errno.ENOSPC)}")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(adapter.torch, "save", save_then_full)
    monkeypatch.setattr(sys, "argv", ["llama-offload", "finetune", "--data", str(text_data), "--out", str(out),
                                      "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", str(tiny_ckpt.parent / "tokenizer.model"),
                                      "--seq_len", "16", "--lora_rank", "4", "--device", "cpu", "--steps", "3",
                                      "--save_every", "2"])
    monkeypatch.delenv("LLAMA_OFFLOAD_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "the disk is full (a save needs about" in errors[0], err
    assert "previous save there, if any, is unchanged" in errors[0]
    assert _temp_dirs(tmp_path) == []  # neither this run's temporary directory nor the killed runs' debris
    assert _state(out)["step"] == 2  # the save before the full disk, whole
    adapter.load_adapter(out)


def test_saved_files_follow_the_umask_and_a_kill_mid_swap_loses_nothing(tmp_path):
    from llama_offload.files.cleanup import _host, remove_stale

    config = lora.LoRAConfig(2, 4.0, ("wq",), lora.ModelShape(64, 1, 4, 2, 192))
    out = adapter.save_adapter(lora.LoRAAdapter(config), tmp_path / "ad", state={"step": 1})
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {n: 0o666 & ~mask for n in (adapter.WEIGHTS_FILE, adapter.CONFIG_FILE, adapter.STATE_FILE)}
    # A run SIGKILLed between moving the previous save aside and renaming the new one in: the next run puts the
    # previous save back instead of removing it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".ad.old-{_host()}-{int(dead.stdout)}-0123abcd"
    aside.mkdir()
    out.rename(aside / "ad")
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert adapter.read_config(tmp_path / "ad") == config


def test_resume_refuses_other_flags_or_data(tiny_ckpt, text_data, tmp_path):
    out = tmp_path / "run"
    finetune(_opts(tiny_ckpt, text_data, out, steps=1), show_progress=False)
    with pytest.raises(ValueError, match=r"seq_len 16 \(now 32\)"):
        finetune(_opts(tiny_ckpt, text_data, out, steps=2, seq_len=32, resume=True), show_progress=False)
    with pytest.raises(ValueError, match=r"already did 1 steps"):
        finetune(_opts(tiny_ckpt, text_data, out, steps=1, resume=True), show_progress=False)
    text_data.write_text(json.dumps({"text": "other words"}) + "\n")
    with pytest.raises(ValueError, match=r"data the saved run's file"):
        finetune(_opts(tiny_ckpt, text_data, out, steps=2, resume=True), show_progress=False)


def test_quantized_base_trains_through_its_own_dequantized_weights():
    # QLoRA-style: the frozen matrices are int4; under autograd each is dequantized into a tensor of its own
    # (not the shared scratch the next matrix would overwrite), so the block-by-block step still equals autograd.
    from llama_offload.model.quant import QuantLinear, quantize_matrix

    def quantized(dtype):
        model, adapter = _adapted(dtype)
        for layer in model.layers:
            for owner in (layer.attention, layer.feed_forward):
                for name in lora.TARGETS:
                    if hasattr(owner, name):
                        wrapped = getattr(owner, name)
                        q = quantize_matrix(wrapped.base.weight.detach().float(), 4, 32)
                        wrapped.base = QuantLinear(q["weight"], q["scales"], q.get("mins"))
        return model, adapter

    tokens, targets = _batch()
    count = int((targets != -100).sum())
    grads = []
    for reference in (True, False):
        model, adapter = quantized(torch.float32)
        freqs = paged.rope_table(model, tokens.shape[1], torch.device("cpu"))
        if reference:
            (paged.plain_loss(model, tokens, targets, freqs) / count).backward()
        else:
            runner = paged.BlockRunner(model.layers, torch.device("cpu"))
            paged.paged_loss_and_backward(model, runner, tokens, targets, freqs, count, _plain_loss_fn)
        grads.append([p.grad for p in adapter.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert all(g.abs().sum() > 0 for g in grads[1])


def test_a_tiny_model_memorises_a_text_and_then_completes_it(tiny_ckpt, tmp_path):
    from llama_offload.generate.generation import Llama

    from llama_offload.checkpoint.load import random_state_dict, save_checkpoint

    # The shared tiny checkpoint (std 0.02) cannot make a confident logit through the final norm, and only the
    # blocks are adapted: this one has weights of std 0.1 and a head of std 1, the scale of real models' logits.
    args = json.loads((tiny_ckpt / "params.json").read_text())
    sd = random_state_dict(ModelArgs(**args), seed=0, std=0.1)
    sd["output.weight"] = sd["output.weight"] * 10
    ckpt = tmp_path / "model"
    save_checkpoint(sd, ModelArgs(**args), ckpt)
    shutil.copy(tiny_ckpt.parent / "tokenizer.model", tmp_path / "tokenizer.model")
    tiny_ckpt = ckpt
    data_path = tmp_path / "one.jsonl"
    data_path.write_text(json.dumps({"text": TEXT}) + "\n")
    out = tmp_path / "memorised"
    finetune(_opts(tiny_ckpt, data_path, out, steps=30, seq_len=48, lora_rank=8, lr=5e-3), show_progress=False)
    history = _state(out)["history"]
    assert history[-1]["loss"] < 0.1 < history[0]["loss"], (history[0]["loss"], history[-1]["loss"])
    prompt = "The lighthouse keeper"
    kw = dict(max_seq_len=64, max_batch_size=1, device="cpu")
    tokenizer = str(tiny_ckpt.parent / "tokenizer.model")
    tuned = Llama.build(tiny_ckpt, tokenizer, lora=str(out), **kw)
    [got] = tuned.text_completion([prompt], temperature=0, max_gen_len=40)
    assert got["generation"].strip() == TEXT[len(prompt):].strip()
    base = Llama.build(tiny_ckpt, tokenizer, **kw)
    [before] = base.text_completion([prompt], temperature=0, max_gen_len=40)
    assert before["generation"].strip() != TEXT[len(prompt):].strip()


def test_feed_forward_chunks_of_positions_give_the_same_step():
    # Long rows run the feed-forward half a chunk of positions at a time, forward and backward.
    chunked = lambda h, w, t, reduction: chunked_cross_entropy(h, w, t, chunk_tokens=5, reduction=reduction)
    _, grads_ref = _one_step(torch.float64, None, reference=True)
    model, adapter = _adapted(torch.float64)
    tokens, targets = _batch()
    freqs = paged.rope_table(model, tokens.shape[1], torch.device("cpu"))
    runner = paged.BlockRunner(model.layers, torch.device("cpu"), ffn_chunk=5)  # 12 positions: chunks of 5, 5, 2
    with torch.no_grad():
        whole = paged.BlockRunner(model.layers, torch.device("cpu")).forward(model.tok_embeddings(tokens), freqs, keep=False)
        torch.testing.assert_close(runner.forward(model.tok_embeddings(tokens), freqs, keep=False), whole,
                                   rtol=1e-12, atol=1e-12)
    paged.paged_loss_and_backward(model, runner, tokens, targets, freqs, int((targets != -100).sum()), chunked)
    for p, r in zip(adapter.parameters(), grads_ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
