"""scripts/finetune.py under an audit hook that notes whether this rank opened the --data file (tests only)."""

import os
import runpy
import sys
from pathlib import Path

data = str(Path(sys.argv[sys.argv.index("--data") + 1]).resolve())
log = Path(os.environ["PP_AUDIT_DIR"]) / f"rank{os.environ['RANK']}"


def hook(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.abspath(os.fsdecode(args[0])) == data and not log.exists():
            log.write_text("opened")


sys.addaudithook(hook)
script = Path(__file__).resolve().parents[2] / "scripts" / "finetune.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
