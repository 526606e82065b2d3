"""Where a conversion writes is checked before any work (issue 11, "Write targets").

The output's place must exist or be creatable, be writable and have room for the estimated checkpoint;
``--force`` replaces only a checkpoint a conversion wrote (it has ``llama_offload.json``), and nothing a
user put in a directory is ever deleted. Misspelled flags are refused before anything is written, and the
"wrote ..." message names the final directory.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from llama_offload.checkpoint import output_dir as convert_module  # noqa: E402
from llama_offload.convert import gguf as convert_gguf_module  # noqa: E402
from llama_offload.checkpoint.meta import META_FILENAME  # noqa: E402
from llama_offload.convert.gguf import convert_gguf  # noqa: E402
from test_convert_gguf import N_VOCAB, gguf_tensors_from_meta, write_gguf  # noqa: E402
from tiny import tiny_args, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=2)
    return write_gguf(tmp_path_factory.mktemp("src") / "m.gguf", args, gguf_tensors_from_meta(tiny_model(args), args))


@pytest.fixture()
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any weight is dequantized: the checks must come first."""
    def boom(*a, **kw):
        raise AssertionError("the conversion started before the write target was checked")
    monkeypatch.setattr(convert_gguf_module, "_read_tensors", boom)


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    from llama_offload.cli.main import main

    monkeypatch.setattr(sys, "argv", ["llama-offload", *argv])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_read_only_parent_is_refused_up_front(gguf_file: Path, tmp_path: Path, monkeypatch, capsys,
                                             no_conversion) -> None:
    def read_only(parent, name, kind="partial"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(parent) / name))
    monkeypatch.setattr(convert_module, "new_temp_dir", read_only)
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(gguf_file), "--out", str(tmp_path / "ro" / "D"))
    assert code == 1, err
    assert f"Cannot write {tmp_path / 'ro' / 'D'}: {tmp_path} is not writable (Read-only file system)" in err
    assert "[Errno" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only mode directory anyway")
def test_read_only_mode_directory(gguf_file: Path, tmp_path: Path, no_conversion) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            convert_gguf(gguf_file, ro / "D")
    finally:
        ro.chmod(0o755)


def test_parent_that_is_a_file(gguf_file: Path, tmp_path: Path, no_conversion) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'f'} is a file"):
        convert_gguf(gguf_file, tmp_path / "f" / "sub" / "D")


def test_missing_parents_are_created(gguf_file: Path, tmp_path: Path) -> None:
    out = convert_gguf(gguf_file, tmp_path / "a" / "b" / "D")
    assert (out / META_FILENAME).is_file()
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["D"]


def test_not_enough_disk_is_refused_before_converting(gguf_file: Path, tmp_path: Path, monkeypatch,
                                                     no_conversion) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    seen = {}

    def tiny_disk(path):
        seen["path"] = Path(path)
        return usage(10 << 30, 10 << 30, 1 << 20)  # 1 MiB free
    monkeypatch.setattr(convert_module.shutil, "disk_usage", tiny_disk)
    with pytest.raises(OSError, match=r"Not enough free disk space .* needs about .* has 1.0 MiB free") as e:
        convert_gguf(gguf_file, tmp_path / "new" / "D", dtype="float32")
    assert "[Errno" not in str(e.value)
    assert seen["path"] == tmp_path  # the nearest directory that exists
    assert list(tmp_path.iterdir()) == []


def test_estimate_follows_the_target_dtype(gguf_file: Path) -> None:
    from gguf import GGUFReader

    import torch

    reader = GGUFReader(gguf_file)
    f32 = convert_gguf_module._estimated_bytes(reader, torch.float32)
    bf16 = convert_gguf_module._estimated_bytes(reader, torch.bfloat16)
    n = sum(int(t.n_elements) for t in reader.tensors)
    assert f32 >= 4 * n and bf16 >= 2 * n and f32 - bf16 >= 2 * n


def test_force_replaces_only_our_checkpoints_cli(gguf_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(gguf_file), "--out", str(user), "--force")
    assert code == 1 and "even with --force" in err and "thesis.tex" in err and "Traceback" not in err, err
    assert [p.name for p in user.iterdir()] == ["thesis.tex"] and (user / "thesis.tex").read_text() == "years of work"

    out = tmp_path / "ckpt"
    code, stdout, err = run_cli(monkeypatch, capsys, "convert", str(gguf_file), "--out", str(out))
    assert code == 0, err
    # The messages name the final directory, never the temporary one.
    assert f"wrote {out} in " in err and ".partial" not in err + stdout, err
    assert f"-> {out}" in stdout
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(gguf_file), "--out", str(out))
    assert code == 1 and "--force" in err
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(gguf_file), "--out", str(out), "--force")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "user"]


def test_misspelled_flag_fails_before_writing(gguf_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(gguf_file), "--out", str(tmp_path / "D"), "--forse")
    assert code == 2, err
    assert "--forse" in err and "did you mean --force?" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
