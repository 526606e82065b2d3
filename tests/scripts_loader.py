"""Import a module of scripts/ by name, once, for the tests of the benchmarks and tools.

The benchmarks live in scripts/bench/, the tools in scripts/tools/, what users run in scripts/. A benchmark run as
``python scripts/bench/NAME.py`` finds ``common`` (scripts/bench/common.py) beside it, because Python searches a
script's own folder first; here the scripts are loaded from their files, so ``common`` is loaded the same way,
under its own name, before any benchmark that imports it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BENCH = SCRIPTS / "bench"
TOOLS = SCRIPTS / "tools"


def script_path(name: str) -> Path:
    """scripts/bench/NAME.py, scripts/tools/NAME.py or scripts/NAME.py, whichever there is."""
    for folder in (BENCH, TOOLS, SCRIPTS):
        if (folder / f"{name}.py").is_file():
            return folder / f"{name}.py"
    raise FileNotFoundError(f"no script {name}.py in {BENCH}, {TOOLS} or {SCRIPTS}")


def load_script(name: str) -> ModuleType:
    path = script_path(name)
    if name in sys.modules:
        loaded = getattr(sys.modules[name], "__file__", None)
        if loaded is None or Path(loaded).resolve() != path:
            raise ImportError(f"a module named {name!r} from {loaded} is imported already; {path} would shadow it")
        return sys.modules[name]
    if path.parent == BENCH and name != "common":
        load_script("common")  # the benchmarks' shared module, as `import common` finds it beside them
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
