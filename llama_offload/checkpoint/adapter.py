"""LoRA adapters on disk: a directory of ``adapter_config.json`` (rank, alpha, targets and the model shape it was
trained on) and ``adapter.safetensors`` (``layers.{i}.{attention|feed_forward}.{name}.lora_A`` (r, in) and
``.lora_B`` (out, r)), written into a temporary sibling and renamed into place, and read back with every
field checked before a tensor is used."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from llama_offload.files.cleanup import deferred_signals, new_temp_dir, remove_tree
from llama_offload.model.lora import FORMAT, TARGET_OWNERS, LoRAAdapter, LoRAConfig, ModelShape, parse_targets



CONFIG_FILE = "adapter_config.json"


WEIGHTS_FILE = "adapter.safetensors"


STATE_FILE = "trainer_state.pt"




class SaveError(OSError):
    """A save that could not be written (a full disk, a read-only directory): one line, nothing left behind.
    ``errno`` is the cause's; the message is the whole text (no "[Errno N]" in front)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


def _file_mode() -> int:
    # safetensors writes its file 0600; everything else this tool writes follows the umask (0644 under 022).
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_bytes(config: LoRAConfig, *, with_state: bool = True) -> int:
    """About the bytes one save writes: adapter.safetensors (fp32 A and B), and with ``with_state`` the trainer
    state beside it (the adapter again plus AdamW's two fp32 moments); a little over, for headers and history."""
    params = sum(config.rank * (o + i) for o, i in (config.shape.matrix(t) for t in config.targets))
    params *= config.shape.n_layers
    pairs = config.shape.n_layers * len(config.targets)
    per_file = 4 * params + 256 * pairs + 4096  # fp32 tensors, a header entry per tensor
    return per_file + ((3 * 4 * params + 1024 * pairs + (1 << 20)) if with_state else 0)


def save_adapter(adapter: LoRAAdapter, out_dir: str | Path, state: Optional[dict] = None) -> Path:
    """Write the adapter directory atomically: a temporary sibling renamed into place, replacing an older save.
    ``state`` (optimizer, step, loss history) goes beside it as STATE_FILE, so that a run can resume.

    The temporary directory is ``cleanup.new_temp_dir``'s (``.NAME.partial-HOST-PID-X``): removed when the write
    fails or is interrupted, and by the next run when a hard kill left it. A write that fails (a full disk) raises
    :class:`SaveError` with what to do; the previous save in ``out_dir`` is then untouched."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_dir(out.parent, out.name, "partial")
    except OSError as e:
        raise SaveError(e.errno, f"Could not save the adapter: cannot write in {out.parent} ({e.strerror or e}). "
                        "Make it writable, or choose another --out.") from None
    try:
        try:
            save_file(adapter.tensors(), str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(adapter.config.to_json(), indent=2) + "\n")
            if state is not None:
                torch.save(state, tmp / STATE_FILE)
            mode = _file_mode()
            for f in tmp.iterdir():
                f.chmod(mode)
        except Exception as e:  # safetensors and torch.save wrap the OSError in errors of their own
            raise _save_error(e, out, adapter.config, state is not None) from None
        with deferred_signals():  # the swap is whole: a signal waits until the new save is in place
            # The previous save waits in .NAME.old-HOST-PID-X/NAME (as a conversion's does): a hard kill here
            # leaves it for the next run to put back (cleanup.remove_stale), never to delete.
            old = new_temp_dir(out.parent, out.name, "old") if out.exists() else None
            if old is not None:
                out.rename(old / out.name)
            try:
                tmp.rename(out)
            except BaseException:
                if old is not None:
                    (old / out.name).rename(out)
                raise
            finally:
                if old is not None:
                    remove_tree(old)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return out


def _save_error(e: BaseException, out: Path, config: LoRAConfig, with_state: bool) -> SaveError:
    import errno as errnos

    code = getattr(e, "errno", None)
    text = str(e)
    full = code in (errnos.ENOSPC, errnos.EDQUOT) or "No space left" in text or "Disk quota" in text
    need = save_bytes(config, with_state=with_state)
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = None
    found = f"; {free / 2**20:.1f} MiB free now" if free is not None else ""
    if full:
        return SaveError(code or errnos.ENOSPC, f"Could not save the adapter to {out}: the disk is full (a save "
                         f"needs about {need / 2**20:.1f} MiB{found}). The previous save there, if any, is unchanged "
                         "and nothing partial was left; free some space and continue with --resume.")
    reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    return SaveError(code or errnos.EIO, f"Could not save the adapter to {out} ({reason}). The previous save there, "
                     "if any, is unchanged and nothing partial was left; fix the cause and continue with --resume.")


def read_config(adapter_dir: str | Path) -> LoRAConfig:
    """The adapter's config, checked, before any tensor is read."""
    d = Path(adapter_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"LoRA adapter directory {d} does not exist. Pass the --out directory that "
                                "llama-offload finetune wrote.")
    path = d / CONFIG_FILE
    if not path.is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a LoRA adapter: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it, as "
                                "llama-offload finetune writes them.")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
        config = LoRAConfig(int(raw["rank"]), float(raw["alpha"]), parse_targets(raw["targets"]),
                            ModelShape(**{k: int(v) for k, v in raw["model"].items()}))
        bad = {k: v for k, v in asdict(config.shape).items() if v < 1}
        if bad:
            raise ValueError(f"its model shape has sizes below 1: {bad}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a llama_offload LoRA config ({e}). Point --lora at a directory written "
                         "by llama-offload finetune.") from None
    config.check()
    check_weights_file(d / WEIGHTS_FILE, config)
    return config


def check_weights_file(path: Path, config: LoRAConfig) -> None:
    """``adapter.safetensors`` whole and fitting ``config``, from its header alone (no tensor is read): its
    header parses, its tensors are the ones the config implies with their shapes, and the file is as long as
    the header says. A truncated or damaged file is refused here, before any model weight is read."""
    size = path.stat().st_size
    what = None
    header: Any = None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if len(head) < 8:
                what = f"it is {size} bytes long, too short to hold even a safetensors header"
            elif n < 2 or n > min(size - 8, 100 << 20):
                what = f"its header length field says {n} bytes, but the file has {size}"
            else:
                header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        what = f"its header is not valid JSON ({e})"
    if what is None and not isinstance(header, dict):
        what = "its header is not a JSON object"
    expected = {}
    if what is None:
        for i in range(config.shape.n_layers):
            for t in config.targets:
                out_features, in_features = config.shape.matrix(t)
                name = f"layers.{i}.{TARGET_OWNERS[t]}.{t}"
                expected[f"{name}.lora_A"] = [config.rank, in_features]
                expected[f"{name}.lora_B"] = [out_features, config.rank]
        found = {k: v for k, v in header.items() if k != "__metadata__"}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        try:
            wrong = sorted(k for k in expected.keys() & found.keys() if list(found[k]["shape"]) != expected[k])
            end = max((int(v["data_offsets"][1]) for v in found.values()), default=0)
        except (TypeError, KeyError, IndexError, ValueError):
            what = "its header does not describe tensors"
        else:
            if missing or extra or wrong:
                what = "; ".join(part for part in (
                    f"missing {', '.join(missing[:3])}" if missing else "",
                    f"unexpected {', '.join(extra[:3])}" if extra else "",
                    f"{wrong[0]} is {tuple(found[wrong[0]]['shape'])}, expected {tuple(expected[wrong[0]])}"
                    if wrong else "") if part)
                what = f"it does not fit its adapter_config.json ({what})"
            elif 8 + n + end != size:
                what = (f"it is {size} bytes long, but its header describes {8 + n + end}: it is truncated"
                        if size < 8 + n + end else f"it is {size} bytes long, {size - 8 - n - end} more than its header "
                        "describes")
    if what is not None:
        raise ValueError(f"LoRA adapter file {path} is damaged: {what}. Copy it again from where it was trained, or "
                         "train the adapter again (llama-offload finetune).")


def load_adapter(adapter_dir: str | Path, device: Optional[torch.device | str] = None) -> LoRAAdapter:
    from safetensors.torch import load_file

    config = read_config(adapter_dir)  # the weights file's header too: a damaged file is refused here
    adapter = LoRAAdapter(config, device)
    path = Path(adapter_dir).expanduser() / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type on a file it cannot read
        raise ValueError(f"LoRA adapter file {path} could not be read ({type(e).__name__}: {e}). Copy it again, or "
                         "train the adapter again.") from None
    adapter.load_tensors(tensors, str(adapter_dir))
    return adapter
