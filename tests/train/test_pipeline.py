"""Pipeline-parallel fine-tuning on gloo (``finetune --pp S``): 2 stages and 2 stages x 2 replicas, with GPipe, 1F1B
and interleaved 1F1B, equal a single process (loss and adapter after two steps); each rank loads only its own
tensors; only the first and the last stage open the data file; bad input is refused on every rank."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llama_offload.checkpoint import adapter
from llama_offload.model.args import ModelArgs
from llama_offload.train.finetune import FinetuneOptions, finetune
from llama_offload.train.stages import balanced_counts, stage_keys, stage_layers
from texts import TEXT
from launch import torchrun

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pp") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"{TEXT} {i}"}) + "\n" for i in range(8)))
    return path


def _flags(ckpt: Path, data: Path, out: Path, **kw) -> list[str]:
    flags = dict(data=data, out=out, ckpt_dir=ckpt, tokenizer_path=ckpt.parent / "tokenizer.model", seq_len=16,
                 lora_rank=4, lr=0.01, device="cpu", steps=2, batch_size=2, max_grad_norm=0.5)
    flags.update(kw)
    if flags.get("full"):
        del flags["lora_rank"]
    # a switch goes bare: fire reads "--full True" as the switch and a stray word
    return [x for k, v in flags.items() for x in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]


def _state(out: Path) -> dict:
    return torch.load(out / adapter.STATE_FILE, weights_only=False)


def test_stages_split_balanced_by_compute_or_by_hand(tiny_ckpt):
    assert balanced_counts(32, 4) == [8, 8, 8, 8]
    assert balanced_counts(32, 4, last_extra=2.4) == [8, 9, 9, 6]  # the head weighs on the last stage
    args = ModelArgs(**json.loads((tiny_ckpt / "params.json").read_text()))
    assert stage_layers(args, 2, "1,1") == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match=r"--pp_layers 2,1 must give 2 stages .* adding up to the model's 2 layers"):
        stage_layers(args, 2, "2,1")
    with pytest.raises(ValueError, match=r"--pp 3 asks for more pipeline stages than the model's 2 layers"):
        stage_layers(args, 3)
    first = stage_keys(args, 0, 1, True, False)
    assert "tok_embeddings.weight" in first and "output.weight" not in first
    assert all(k.startswith(("tok_embeddings", "layers.0.")) for k in first)


@pytest.fixture(scope="module")
def three_layers(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint's shape with three layers, so that a middle stage exists."""
    from llama_offload.checkpoint.load import random_state_dict, save_checkpoint

    root = tmp_path_factory.mktemp("pp-model")
    (root / "tokenizer.model").write_bytes((tiny_ckpt.parent / "tokenizer.model").read_bytes())
    args = ModelArgs(**{**json.loads((tiny_ckpt / "params.json").read_text()), "n_layers": 3})
    save_checkpoint(random_state_dict(args, seed=3), args, root / "three")
    return root / "three"


def test_pipeline_stages_and_replicas_equal_one_process(three_layers, data_file, tmp_path):
    ckpt = three_layers
    # One process sees each row as its own micro-batch, as the pipeline sees each as a microbatch: the same sums.
    opts = dict(data=str(data_file), out=str(tmp_path / "one"), ckpt_dir=str(ckpt),
                tokenizer_path=str(ckpt.parent / "tokenizer.model"), seq_len=16, lora_rank=4, lr=1e-3,
                device="cpu", steps=2, batch_size=1, grad_accum=4, max_grad_norm=0.5)
    finetune(FinetuneOptions(**opts), show_progress=False)
    reference = _state(tmp_path / "one")
    audit = tmp_path / "opens"
    audit.mkdir()
    # (two stages alone, 1F1B: test_full_fine_tuning_in_stages_equals_one_process_and_resumes)
    runs = (("pp3-gpipe", 3, dict(pp=3, schedule="gpipe", batch_size=4, microbatches=4)),
            ("pp2xdp2-1f1b", 4, dict(pp=2, schedule="1f1b", batch_size=2, pp_layers="1,2")))
    for name, nproc, extra in runs:
        out = tmp_path / name
        script = Path(__file__).parent / "pp_audit.py" if name == "pp3-gpipe" else REPO / "scripts" / "finetune.py"
        run = torchrun(nproc, [str(script), *_flags(ckpt, data_file, out, lr=1e-3, **extra)],
                        env={"PP_AUDIT_DIR": str(audit)})
        assert run.returncode == 0, run.stderr[-3000:]
        got = _state(out)
        assert got["world_size"] == nproc and got["pp"] == extra["pp"]
        for a, b in zip(reference["history"], got["history"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), name
        for k, t in reference["adapter"].items():
            torch.testing.assert_close(got["adapter"][k], t, rtol=1e-5, atol=1e-5, msg=f"{name} {k}")
        if name == "pp3-gpipe":
            # only the first and the last stage opened the data; each stage read only its own tensors
            assert sorted(p.name for p in audit.iterdir()) == ["rank0", "rank2"]
            reads = {int(m[0]): (int(m[1]), int(m[2])) for m in
                     re.findall(r"\[rank (\d)\] stage \d of 3.*read (\d+) tensors, (\d+) bytes", run.stderr)}
            args = ModelArgs(**json.loads((ckpt / "params.json").read_text()))
            block = 9 * 4 * 0 + sum(t.numel() * 4 for t in _block_tensors(args))
            edge = args.vocab_size * args.dim * 4
            assert reads == {0: (10, edge + block), 1: (9, block), 2: (11, block + edge + args.dim * 4)}, reads


def test_full_fine_tuning_in_stages_equals_one_process_and_resumes(three_layers, data_file, tmp_path):
    from llama_offload.checkpoint.record import open_shard

    ckpt = three_layers
    opts = dict(data=str(data_file), out=str(tmp_path / "one"), ckpt_dir=str(ckpt),
                tokenizer_path=str(ckpt.parent / "tokenizer.model"), seq_len=16, lr=1e-3, device="cpu", steps=2,
                batch_size=1, grad_accum=2, max_grad_norm=0.5, full=True, host_memory_gb=4.0)
    finetune(FinetuneOptions(**opts), show_progress=False)
    script = str(REPO / "scripts" / "finetune.py")
    flags = dict(full=True, pp=2, batch_size=2, lr=1e-3)
    # one step, saved and stopped; then resumed from the saved weights and optimizer states for the second
    for kw in (dict(steps=1), dict(steps=2, resume=True)):
        run = torchrun(2, [script, *_flags(ckpt, data_file, tmp_path / "pp2", **flags, **kw)])
        assert run.returncode == 0, run.stderr[-3000:]
        names = sorted(p.name for p in (tmp_path / "pp2").iterdir())
        assert "trainer_state.stage0.pt" in names and "trainer_state.stage1.pt" in names
        assert torch.load(tmp_path / "pp2" / "trainer_state.stage1.pt", weights_only=False)["step"] == kw["steps"]
    one, staged = (open_shard(tmp_path / n / "consolidated.00.pth") for n in ("one", "pp2"))
    assert sorted(one) == sorted(staged)
    for k in one:
        torch.testing.assert_close(staged[k], one[k], rtol=1e-5, atol=1e-5, msg=k)


def _block_tensors(args: ModelArgs) -> list[torch.Tensor]:
    from llama_offload.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1)
    return list(model.layers[0].parameters())


def test_bad_pipeline_flags_are_one_line_on_every_rank(tiny_ckpt, data_file, tmp_path):
    from llama_offload.train.pipeline_trainer import check_pipeline

    with pytest.raises(ValueError, match=r"--pp 2 must divide the number of processes \(3\)"):
        check_pipeline(2, 3, 8, "1f1b", 2, 2)
    with pytest.raises(ValueError, match=r"--pp 4 asks for 4 pipeline stages, more than the model's 2 layers"):
        check_pipeline(4, 4, 2, "1f1b", 4, 4)
    with pytest.raises(ValueError, match=r"--schedule 1f1b needs at least as many microbatches as stages"):
        check_pipeline(2, 2, 8, "1f1b", 1, 2)
    with pytest.raises(ValueError, match=r"--microbatches 3 must divide --batch_size 4"):
        check_pipeline(2, 2, 8, "gpipe", 3, 4)
    with pytest.raises(ValueError, match=r"--schedule must be one of gpipe, 1f1b, found 'zbv'"):
        check_pipeline(2, 2, 8, "zbv", 2, 2)
    with pytest.raises(ValueError, match=r"--eval_data, --gpu_memory_gb are not available with pipeline stages yet"):
        FinetuneOptions(data="d", out="o", pp=2, eval_data="e", gpu_memory_gb=8.0).check()
    run = torchrun(2, [str(REPO / "scripts" / "finetune.py"), *_flags(tiny_ckpt, data_file, tmp_path / "out", pp=2,
                                                                       microbatches=1, batch_size=1)])
    # torchrun reports the failed workers (its own launcher traceback); the workers' own output is one line each
    assert run.returncode != 0 and "llama_offload/" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "needs at least as many microbatches as stages" in line]
    # every rank refuses on its own, before any collective; torchrun stops the others as soon as one has exited,
    # so the slower rank's line may be cut off
    assert lines and all(line.startswith(("[rank 0] finetune.py: error: --schedule 1f1b needs at least as many",
                                          "[rank 1] finetune.py: error: --schedule 1f1b needs at least as many"))
                         for line in lines), run.stderr[-2000:]
    assert not (tmp_path / "out").exists()
