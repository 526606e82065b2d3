"""Full fine-tuning on a GPU (``finetune --full``): two steps with every block paged equal two steps with every block
resident, bit for bit (the saved weights and the master weights), with and without clipping; in fp32 the paged
steps match plain autograd and torch.optim.AdamW on the same GPU. Run on the GPU machine: pytest -m cuda -s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_offload.checkpoint.load import load_model
from llama_offload.checkpoint.record import open_shard
from llama_offload.train import paged
from llama_offload.train.finetune import FinetuneOptions, finetune, make_trainer, prepare
from llama_offload.train.schedule import step_rows

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TEXT = "The lighthouse keeper counts the ships every night and writes their names in a blue book."


@pytest.fixture()
def text_data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"{TEXT} {i}"}) + "\n" for i in range(4)))
    return path


def _opts(ckpt: Path, data: Path, out: Path, **kw) -> FinetuneOptions:
    base = dict(data=str(data), out=str(out), ckpt_dir=str(ckpt), tokenizer_path=str(ckpt.parent / "tokenizer.model"),
                seq_len=32, lr=1e-3, device="cuda", full=True, host_memory_gb=4.0, steps=2)
    base.update(kw)
    return FinetuneOptions(**base)


@pytest.mark.parametrize("clip", [None, 0.1])
def test_paged_steps_equal_resident_steps_bit_for_bit(tiny_ckpt, text_data, tmp_path, clip):
    runs = {}
    for name, kw in (("paged", {}), ("resident", dict(gpu_memory_gb=8.0))):
        out = finetune(_opts(tiny_ckpt, text_data, tmp_path / name, max_grad_norm=clip, grad_accum=2, **kw),
                       show_progress=False)
        runs[name] = (open_shard(out / "consolidated.00.pth"), torch.load(out / "trainer_state.pt", weights_only=False))
    (paged_sd, paged_state), (resident_sd, resident_state) = runs["paged"], runs["resident"]
    source = open_shard(tiny_ckpt / "consolidated.00.pth")
    assert sorted(paged_sd) == sorted(resident_sd) == sorted(source)
    for k in paged_sd:
        assert torch.equal(paged_sd[k], resident_sd[k]), k
        assert not torch.equal(paged_sd[k], source[k]), f"{k} did not train"
    for u, m in paged_state["optimizer"]["masters"].items():
        assert torch.equal(m, resident_state["optimizer"]["masters"][u]), u
    assert [r["loss"] for r in paged_state["history"]] == [r["loss"] for r in resident_state["history"]]


def test_fp32_paged_steps_match_plain_autograd_and_adamw_on_the_gpu(tiny_ckpt, text_data, tmp_path):
    opts = _opts(tiny_ckpt, text_data, tmp_path / "out", dtype="float32", max_grad_norm=0.5)
    prep = prepare(opts, torch.device("cuda"))
    trainer = make_trainer(prep, show_progress=False)
    try:
        for s in range(2):
            trainer.train_step(s)
        trainer.update.settle()
        ours = {trainer.names[id(p)]: m[at : at + p.numel()].view(p.shape)
                for u, m in trainer.update.masters.items()
                for p, at in zip(trainer.update.units[u].params, trainer.update.units[u].offsets)}
    finally:
        trainer.close()
    model = load_model(prep.ckpt_dir, max_seq_len=32, max_batch_size=1, dtype=torch.float32,
                       vocab_size=prep.params.vocab_size, model_parallel_size=1, show_progress=False).to("cuda")
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    freqs = paged.rope_table(model, 32, torch.device("cuda"))
    for s in range(2):
        rows = step_rows(s, 1, prep.inputs.shape[0], opts.seed)
        inputs, targets = prep.inputs[rows].cuda(), prep.targets[rows].cuda()
        (paged.plain_loss(model, inputs, targets, freqs) / float((targets != -100).sum())).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.detach().cpu(), rtol=1e-5, atol=1e-5, msg=name)
