"""Full fine-tuning on the CPU (``finetune --full``): N steps through the paged schedule and the host optimizer equal
N steps of plain autograd and plain ``torch.optim.AdamW`` (with gradient accumulation, with clipping), 8-bit and
bf16 moments track fp32 ones, resume equals the uninterrupted run bit for bit, the saved checkpoint runs and has
learned its text, two gloo ranks equal one process, and bad input is refused before the weights are read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_offload.checkpoint.load import load_model, random_state_dict, save_checkpoint
from llama_offload.checkpoint.record import open_shard
from llama_offload.model.args import ModelArgs
from llama_offload.train import paged
from llama_offload.train.finetune import FinetuneOptions, finetune, make_trainer, prepare
from llama_offload.train.schedule import step_rows
from texts import TEXT
from launch import torchrun

REPO = Path(__file__).resolve().parents[2]
def _opts(ckpt: Path, data_path: Path, out: Path, **kw) -> FinetuneOptions:
    base = dict(data=str(data_path), out=str(out), ckpt_dir=str(ckpt), tokenizer_path=str(ckpt.parent / "tokenizer.model"),
                seq_len=16, lr=1e-2, device="cpu", full=True, host_memory_gb=4.0)
    base.update(kw)
    return FinetuneOptions(**base)


def _reference(prep, steps: int) -> torch.nn.Module:
    """The plain path: the whole model under autograd, full logits, clip_grad_norm_, torch.optim.AdamW."""
    opts = prep.opts
    model = load_model(prep.ckpt_dir, max_seq_len=opts.seq_len, max_batch_size=opts.batch_size, dtype=torch.float32,
                       vocab_size=prep.params.vocab_size, model_parallel_size=1, show_progress=False)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    freqs = paged.rope_table(model, opts.seq_len, torch.device("cpu"))
    for step in range(steps):
        rows = step_rows(step, opts.batch_size * opts.grad_accum, prep.inputs.shape[0], opts.seed)
        inputs, targets = prep.inputs[rows], prep.targets[rows]
        count = float((targets != -100).sum())
        for micro in range(opts.grad_accum):
            part = slice(micro * opts.batch_size, (micro + 1) * opts.batch_size)
            (paged.plain_loss(model, inputs[part], targets[part], freqs) / count).backward()
        if opts.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _plain_loss_fn(h, weight, targets, reduction):
    logits = torch.nn.functional.linear(h, weight).float()
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                             reduction=reduction)


def _trained(opts: FinetuneOptions, steps: int, *, plain_loss: bool = False):
    prep = prepare(opts, torch.device("cpu"))
    trainer = make_trainer(prep, show_progress=False)
    if plain_loss:  # the reference's own loss: what remains to differ is the schedule and the optimizer
        trainer.loss_fn = _plain_loss_fn
    try:
        norms = []
        for step in range(steps):
            trainer.train_step(step)
            norms.append(trainer.grad_norm)
        trainer.update.settle()
        return prep, trainer, norms
    finally:
        trainer.close()


@pytest.mark.parametrize("accum,clip", [(1, None), (2, None), (1, 0.05), (2, 0.05)], ids=["plain", "acc", "clip", "accumulated-and-clipped"])
def test_paged_full_steps_equal_plain_autograd_and_adamw(tiny_ckpt, text_data, tmp_path, accum, clip):
    # lr 1e-3: Adam divides by sqrt(v), so where a gradient is near zero a last-bit difference between torch's
    # fused AdamW and its for-loop one grows into lr x 1e-4; the gradients themselves are bit-equal.
    opts = _opts(tiny_ckpt, text_data, tmp_path / "out", steps=3, batch_size=1, grad_accum=accum,
                 max_grad_norm=clip, weight_decay=0.1, lr=1e-3)
    prep, trainer, norms = _trained(opts, 3, plain_loss=True)
    reference = dict(_reference(prep, 3).named_parameters())
    ours = dict(trainer.model.named_parameters())
    assert sorted(ours) == sorted(reference) and len(ours) == 2 + 2 * 9 + 1
    base = open_shard(tiny_ckpt / "consolidated.00.pth")
    for name, p in ours.items():
        assert not torch.equal(p.detach(), base[name].float()), f"{name} did not train"
        torch.testing.assert_close(p.detach(), reference[name].detach(), rtol=1e-6, atol=1e-6, msg=name)
    # the masters are what the working copies were rounded from (both fp32 on the CPU: equal)
    for u, unit in enumerate(trainer.update.units):
        for p, at in zip(unit.params, unit.offsets):
            assert torch.equal(trainer.update.masters[u][at : at + p.numel()].view(p.shape), p.detach())
    if clip is not None:
        assert all(n is not None and n > clip for n in norms)  # the clip really cut every step
    else:
        assert norms == [None, None, None]


def test_accumulated_and_clipped_gradients_equal_plain_autograd_bit_for_bit(tiny_ckpt, text_data, tmp_path):
    # What reaches the optimizer: two micro-batches summed on the host and clipped by the global norm from
    # per-parameter norms, against autograd's accumulation and torch.nn.utils.clip_grad_norm_.
    opts = _opts(tiny_ckpt, text_data, tmp_path / "out", steps=1, batch_size=1, grad_accum=2, max_grad_norm=0.05)
    prep, trainer, norms = _trained(opts, 1, plain_loss=True)
    model = load_model(prep.ckpt_dir, max_seq_len=16, max_batch_size=1, dtype=torch.float32,
                       vocab_size=prep.params.vocab_size, model_parallel_size=1, show_progress=False)
    for p in model.parameters():
        p.requires_grad_(True)
    freqs = paged.rope_table(model, 16, torch.device("cpu"))
    rows = step_rows(0, 2, prep.inputs.shape[0], opts.seed)
    inputs, targets = prep.inputs[rows], prep.targets[rows]
    count = float((targets != -100).sum())
    for micro in range(2):
        (paged.plain_loss(model, inputs[micro : micro + 1], targets[micro : micro + 1], freqs) / count).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    assert norms == [float(total)] and float(total) > 0.05
    plain = dict(model.named_parameters())
    checked = 0
    for u, unit in enumerate(trainer.update.units):
        for p, at in zip(unit.params, unit.offsets):
            ours = trainer.update.grads[u][at : at + p.numel()].view(p.shape)  # clipped in place by the step
            assert torch.equal(ours, plain[trainer.names[id(p)]].grad), trainer.names[id(p)]
            checked += 1
    assert checked == len(plain)


def _losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history]


def test_bf16_and_int8_moments_follow_fp32_moments(tiny_ckpt, text_data, tmp_path):
    curves = {}
    for state in ("fp32", "bf16", "int8"):
        out = tmp_path / state
        finetune(_opts(tiny_ckpt, text_data, out, steps=8, optim_state=state, lr=3e-3), show_progress=False)
        curves[state] = _losses(torch.load(out / "trainer_state.pt", weights_only=False)["history"])
    fp32 = curves["fp32"]
    assert fp32[-1] < 0.9 * fp32[0]
    # Rounding the moments changes each update by well under 1% here; after 8 steps the losses stay within 2%.
    for state in ("bf16", "int8"):
        for a, b in zip(curves[state], fp32):
            assert abs(a - b) <= 0.02 * b, (state, curves[state], fp32)
        assert curves[state] != fp32  # the states really differ


def test_resume_equals_the_uninterrupted_run_bit_for_bit(tiny_ckpt, text_data, tmp_path):
    kw = dict(batch_size=1, grad_accum=2, max_grad_norm=0.5, eval_data=str(text_data), eval_every=2)
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "whole", steps=4, **kw), show_progress=False)
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "parts", steps=2, **kw), show_progress=False)
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "parts", steps=4, resume=True, **kw), show_progress=False)
    whole = torch.load(tmp_path / "whole" / "trainer_state.pt", weights_only=False)
    parts = torch.load(tmp_path / "parts" / "trainer_state.pt", weights_only=False)
    assert whole["step"] == parts["step"] == 4
    assert _losses(whole["history"]) == _losses(parts["history"])
    for u, master in whole["optimizer"]["masters"].items():
        assert torch.equal(master, parts["optimizer"]["masters"][u])
    a, b = open_shard(tmp_path / "whole" / "consolidated.00.pth"), open_shard(tmp_path / "parts" / "consolidated.00.pth")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_saved_checkpoint_runs_and_has_learned_its_text(tiny_ckpt, tmp_path):
    from llama_offload.checkpoint.meta import read_checkpoint_meta
    from llama_offload.generate.generation import Llama

    # The shared tiny checkpoint (std 0.02) learns slowly through its final norm: this one has weights of std 0.1
    # and a head of std 1, the scale of real models' logits (as the LoRA test's).
    args = ModelArgs(**json.loads((tiny_ckpt / "params.json").read_text()))
    sd = random_state_dict(args, seed=0, std=0.1)
    sd["output.weight"] = sd["output.weight"] * 10
    ckpt = tmp_path / "models" / "model"
    save_checkpoint(sd, args, ckpt)
    (ckpt.parent / "tokenizer.model").write_bytes((tiny_ckpt.parent / "tokenizer.model").read_bytes())
    tiny_ckpt = ckpt
    data_path = tmp_path / "one.jsonl"
    data_path.write_text(json.dumps({"text": TEXT}) + "\n")
    out = tmp_path / "tuned"
    finetune(_opts(tiny_ckpt, data_path, out, steps=30, seq_len=48, lr=1e-2), show_progress=False)
    history = torch.load(out / "trainer_state.pt", weights_only=False)["history"]
    assert history[-1]["loss"] < 0.1 < history[0]["loss"], (history[0]["loss"], history[-1]["loss"])
    assert (out / "params.json").read_text() == (tiny_ckpt / "params.json").read_text()
    saved, source = open_shard(out / "consolidated.00.pth"), open_shard(tiny_ckpt / "consolidated.00.pth")
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in source.items()}
    [record] = read_checkpoint_meta(out)["finetuned"]
    assert record["kind"] == "full" and record["steps"] == 30
    prompt = "The lighthouse keeper"
    tuned = Llama.build(out, str(out / "tokenizer.model"), max_seq_len=64, max_batch_size=1, device="cpu")
    [got] = tuned.text_completion([prompt], temperature=0, max_gen_len=40)
    assert got["generation"].strip() == TEXT[len(prompt):].strip()


@pytest.mark.parametrize("clip", [0.5, None], ids=["clipped", "updated-during-the-backward"])
def test_two_gloo_ranks_equal_one_process(tiny_ckpt, text_data, tmp_path, clip):
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "one", steps=2, batch_size=2, max_grad_norm=clip),
             show_progress=False)
    run = torchrun(2, [str(REPO / "scripts" / "finetune.py"), "--full", "--data", str(text_data),
                       "--out", str(tmp_path / "two"), "--ckpt_dir", str(tiny_ckpt),
                       "--tokenizer_path", str(tiny_ckpt.parent / "tokenizer.model"), "--seq_len", "16", "--lr", "0.01",
                       "--device", "cpu", "--steps", "2", "--batch_size", "1", "--host_memory_gb", "4",
                       *(["--max_grad_norm", str(clip)] if clip else [])])
    assert run.returncode == 0, run.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert "trainer_state.rank0.pt" in names and "trainer_state.rank1.pt" in names
    one = torch.load(tmp_path / "one" / "trainer_state.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "trainer_state.rank0.pt", weights_only=False)
    for a, b in zip(one["history"], two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a.get("grad_norm") == pytest.approx(b.get("grad_norm"), rel=1e-5)
    # each rank holds the masters of the units it owns (unit u on rank u % 2)
    rank1 = torch.load(tmp_path / "two" / "trainer_state.rank1.pt", weights_only=False)
    assert sorted(two["optimizer"]["masters"]) == [0, 2] and sorted(rank1["optimizer"]["masters"]) == [1, 3]
    a, b = open_shard(tmp_path / "one" / "consolidated.00.pth"), open_shard(tmp_path / "two" / "consolidated.00.pth")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)  # Adam amplifies rounding in tiny gradients


def test_bad_input_is_refused_before_the_weights_are_read(tiny_ckpt, text_data, tmp_path, monkeypatch):
    from llama_offload.convert.quantize import quantize_checkpoint
    from llama_offload.model.quant import QuantSpec
    from llama_offload.train import finetune as ft

    quantized = tmp_path / "q4"
    quantize_checkpoint(tiny_ckpt, quantized, QuantSpec(4, 32))

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(ft, "load_model", no_load)
    out = tmp_path / "out"
    cases = [
        (dict(ckpt_dir=str(quantized), tokenizer_path=str(tiny_ckpt.parent / "tokenizer.model")), ValueError,
         r"--full trains every weight, and .*q4 is quantized.*drop --full"),
        (dict(lora_rank=8), ValueError, r"--full trains every weight, so it takes no LoRA flags \(found --lora_rank 8\)"),
        (dict(full=False, optim_state="bf16", host_memory_gb=None), ValueError,
         r"--optim_state belongs to full fine-tuning; add --full"),
        (dict(optim_state="int4"), ValueError, r"--optim_state must be one of fp32, bf16, int8, found 'int4'"),
        (dict(host_memory_gb=0.0001), ValueError,
         r"needs .* GiB of host memory per process \(master weights .*more than --host_memory_gb .*--optim_state bf16"),
        (dict(max_grad_norm=-1.0), ValueError, r"--max_grad_norm must be a positive number"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            finetune(_opts(tiny_ckpt, text_data, out, **{"steps": 1, **kw}), show_progress=False)
    assert not out.exists()
    # --out holding a user's files is never written, --force or not; a LoRA run is not resumed as --full
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; nothing in it is overwritten"):
        finetune(_opts(tiny_ckpt, text_data, out, steps=1), show_progress=False)
    with pytest.raises(FileExistsError, match=r"holds files a conversion does not write \(notes.txt\)"):
        finetune(_opts(tiny_ckpt, text_data, out, steps=1, force=True), show_progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "trainer_state.pt").write_bytes(b"")
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"trainer_state.pt could not be read"):
        finetune(_opts(tiny_ckpt, text_data, out, steps=2, resume=True), show_progress=False)


def test_an_existing_checkpoint_is_replaced_only_with_force(tiny_ckpt, text_data, tmp_path):
    out = tmp_path / "tuned"
    finetune(_opts(tiny_ckpt, text_data, out, steps=1), show_progress=False)
    first = open_shard(out / "consolidated.00.pth")["output.weight"].clone()
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        finetune(_opts(tiny_ckpt, text_data, out, steps=2), show_progress=False)
    assert torch.equal(open_shard(out / "consolidated.00.pth")["output.weight"], first)
    finetune(_opts(tiny_ckpt, text_data, out, steps=2, force=True), show_progress=False)
    assert torch.load(out / "trainer_state.pt", weights_only=False)["step"] == 2


def test_a_model_parallel_source_is_written_back_in_its_shard_count(tiny_ckpt, text_data, tmp_path):
    args = ModelArgs(**json.loads((tiny_ckpt / "params.json").read_text()))
    two = tmp_path / "models" / "mp2"
    save_checkpoint(random_state_dict(args, seed=1, dtype=torch.bfloat16), args, two, num_shards=2)
    (tmp_path / "models" / "tokenizer.model").write_bytes((tiny_ckpt.parent / "tokenizer.model").read_bytes())
    out = tmp_path / "tuned"
    finetune(_opts(two, text_data, out, steps=1), show_progress=False)
    assert sorted(p.name for p in out.glob("consolidated.*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    for i in range(2):
        saved, source = open_shard(out / f"consolidated.0{i}.pth"), open_shard(two / f"consolidated.0{i}.pth")
        assert {k: (v.dtype, v.shape) for k, v in saved.items()} == {k: (v.dtype, v.shape) for k, v in source.items()}


def test_a_dry_run_prints_the_plan_and_reads_no_weight(tiny_ckpt, text_data, tmp_path, monkeypatch, capsys):
    from llama_offload.train import finetune as ft

    def no_load(*a, **k):
        raise AssertionError("a dry run loaded the weights")

    monkeypatch.setattr(ft, "load_model", no_load)
    out = tmp_path / "out"
    finetune(_opts(tiny_ckpt, text_data, out, steps=1, dry_run=True, device="cuda", gpu_memory_gb=1.0),
             show_progress=False)
    err = capsys.readouterr().err
    assert "every weight" in err and "GPU: 2 of 2 blocks resident" in err and "host:" in err and "dry run" in err
    assert not out.exists()


def test_the_host_plan_of_an_8b_model_at_128k_tokens():
    from llama_offload.model.presets import PRESETS
    from llama_offload.train import budget

    args = ModelArgs(**PRESETS["llama3.1-8b"])
    kw = dict(seq_len=131072, batch_size=1, itemsize=2, world=1, keep_grads=False, on_gpu=True)
    # fp32 moments with the activation checkpoints on the host: 8.03e9 x (4 + 8 + 2) B + 32 GiB does not fit 128 GiB
    with pytest.raises(ValueError, match=r"needs 1[34]\d\.\d GiB of host memory .*activation checkpoints 32\.0 .*"
                                         r"--optim_state bf16 \(saves 29\.9 GiB\)"):
        budget.plan_full_training(args, optim_state="fp32", offload_activations=True, gpu_memory_gb=None,
                                  host_memory_gb=128, **kw)
    # on an 80 GB GPU the checkpoints stay there, and fp32 moments fit beside the master weights
    plan = budget.plan_full_training(args, optim_state="fp32", offload_activations=None, gpu_memory_gb=78,
                                     host_memory_gb=120, **kw)
    assert not plan.checkpoints_on_host and plan.gpu.expected_peak_bytes <= 78 * budget.GiB
    assert 100 < plan.host_bytes / budget.GiB < 120
    # bf16 moments bring the host share down by 4 bytes a parameter
    small = budget.plan_full_training(args, optim_state="bf16", offload_activations=None, gpu_memory_gb=78,
                                      host_memory_gb=120, **kw)
    assert plan.host_bytes - small.host_bytes == 4 * budget.param_counts(args)["held"]


def test_an_interrupted_run_saves_where_it_stopped_and_resumes_to_the_same_weights(tiny_ckpt, text_data, tmp_path,
                                                                                      monkeypatch):
    from llama_offload.train.trainer import Trainer

    finetune(_opts(tiny_ckpt, text_data, tmp_path / "whole", steps=3), show_progress=False)
    real = Trainer.train_step

    def stop_at_two(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(Trainer, "train_step", stop_at_two)
    with pytest.raises(KeyboardInterrupt):
        finetune(_opts(tiny_ckpt, text_data, tmp_path / "cut", steps=3), show_progress=False)
    assert torch.load(tmp_path / "cut" / "trainer_state.pt", weights_only=False)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    monkeypatch.setattr(Trainer, "train_step", real)
    finetune(_opts(tiny_ckpt, text_data, tmp_path / "cut", steps=3, resume=True), show_progress=False)
    a, b = open_shard(tmp_path / "whole" / "consolidated.00.pth"), open_shard(tmp_path / "cut" / "consolidated.00.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
