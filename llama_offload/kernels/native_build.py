"""Builds a C++ source of llama_offload/csrc into torch operators on this machine, at first use, and loads it.

The CPU lane's kernels (csrc/cpu_gemv.cpp, csrc/cpu_attention.cpp, and the vector layer they share,
csrc/simd.h) are compiled for the CPU that runs them (``-march=native``), so they are built where they run
rather than shipped: one compiler call of a few seconds per source, against the headers and libraries of the
installed torch, with no Python headers and no build tool beyond a C++ compiler. Each library is cached under
``~/.cache/llama_offload/kernels`` (``LLAMA_OFFLOAD_CACHE`` moves it), named by a hash of the source and the
headers, the torch version, the compiler and the CPU, so an upgrade of any of them builds again. Concurrent
builds (several ranks) each write a private file and rename it into place.

Nothing here is required: without a compiler, or where the build fails, ``load`` returns None with the reason,
and the caller uses torch's own kernels. ``LLAMA_OFFLOAD_NATIVE=0`` turns the native kernels off;
``LLAMA_OFFLOAD_CXXFLAGS`` adds compiler flags.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

CSRC = Path(__file__).parent / "csrc"
BUILD_TIMEOUT_S = 300

_loaded: dict[str, Optional[str]] = {}  # source name -> None once loaded, else why it could not be
_said: set[str] = set()  # the sources whose failure was reported


def cache_root() -> Path:
    root = os.environ.get("LLAMA_OFFLOAD_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "llama_offload"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return ""


def _command(cxx: str, source: Path, target: Path, std: str) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = cpp_extension.library_paths()[0]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [cxx, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", f"-std={std}", "-w", *_extra_flags(),
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in cpp_extension.include_paths()),
            str(source), f"-L{torch_lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}", "-o", str(target)]


def _extra_flags() -> list[str]:
    """``LLAMA_OFFLOAD_CXXFLAGS``, after -march=native: e.g. ``-march=x86-64-v3`` for a library that runs on every
    AVX2 machine of a cluster, or ``-mno-avx512f`` (the tests build the AVX2 and plain paths this way)."""
    return shlex.split(os.environ.get("LLAMA_OFFLOAD_CXXFLAGS", ""))


def _build(source: Path, target: Path, cxx: str) -> Optional[str]:
    """Compiles ``source`` into ``target``; None, or the compiler's last words."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    error = ""
    # torch's headers ask for C++20 from 2.10 on; older compilers know only C++17, which older torch needs.
    for std in ("c++20", "c++17"):
        try:
            done = subprocess.run(_command(cxx, source, tmp, std), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"the compiler ran past {BUILD_TIMEOUT_S} s"
        except OSError as e:
            return str(e)
        if done.returncode == 0:
            os.replace(tmp, target)
            return None
        error = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    tmp.unlink(missing_ok=True)
    return error


def load(name: str, verbose: bool = True) -> Optional[str]:
    """Builds (once per machine) and loads ``csrc/<name>.cpp``; None when its operators are registered, else
    why they are not (no compiler, a failed build, turned off). Never raises."""
    if name not in _loaded:
        _loaded[name] = _load(name, verbose)
    why = _loaded[name]
    if why is not None and verbose and name not in _said:  # said once, by the first call that may speak
        _said.add(name)
        print(f"llama_offload: the native CPU kernels are not available ({why}); the CPU lane uses torch's kernels.",
              file=sys.stderr)
    return why


def _target(name: str, cxx: str) -> Path:
    """Where ``csrc/<name>.cpp``'s library is cached: named by the source, the headers the sources share, torch,
    the compiler, the CPU and the extra flags."""
    headers = [h.read_text() for h in sorted(CSRC.glob("*.h"))]
    key = hashlib.sha1("\n".join([(CSRC / f"{name}.cpp").read_text(), *headers, torch.__version__, _version(cxx),
                                  _cpu_flags(), *_extra_flags()]).encode())
    return cache_root() / "kernels" / f"{name}-{key.hexdigest()[:16]}.so"


def build_together(names: Sequence[str], verbose: bool = True) -> None:
    """Builds those of ``csrc/<name>.cpp`` not built yet side by side, one compiler process each: a run on the CPU
    loads all three sources, and on two cores they took 35 s one after another. ``load`` then finds them built
    (a failed build is remembered as load's reason, not tried again). Never raises."""
    if os.environ.get("LLAMA_OFFLOAD_NATIVE", "1").strip() in ("0", "false", "no", "off") or \
            not sys.platform.startswith("linux"):
        return
    cxx = _compiler()
    if cxx is None:
        return
    missing = {n: _target(n, cxx) for n in names if n not in _loaded}
    missing = {n: t for n, t in missing.items() if not t.exists()}
    if not missing:
        return
    try:
        next(iter(missing.values())).parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # load() says why
    start = time.perf_counter()
    if verbose:
        print(f"llama_offload: building the native CPU kernels for this machine (once, {len(missing)} sources side by "
              f"side) into {next(iter(missing.values())).parent}", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=len(missing)) as pool:
        errors = dict(zip(missing, pool.map(lambda n: _build(CSRC / f"{n}.cpp", missing[n], cxx), missing)))
    for name, error in errors.items():
        if error is not None:
            _loaded[name] = f"the build failed: {error}"
    if verbose:
        print(f"llama_offload: built in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def _load(name: str, verbose: bool) -> Optional[str]:
    if os.environ.get("LLAMA_OFFLOAD_NATIVE", "1").strip() in ("0", "false", "no", "off"):
        return "LLAMA_OFFLOAD_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return f"built on Linux only, this is {sys.platform}"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found: install g++ or set CXX"
    source, target = CSRC / f"{name}.cpp", _target(name, cxx)
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot write {target.parent}: {e.strerror}"
        start = time.perf_counter()
        if verbose:
            print(f"llama_offload: building the native CPU kernels for this machine (once, a few seconds) into "
                  f"{target.parent}", file=sys.stderr)
        error = _build(source, target, cxx)
        if error is not None:
            return f"the build failed: {error}"
        if verbose:
            print(f"llama_offload: built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if any(Path(p).name.startswith(f"{name}-") for p in torch.ops.loaded_libraries):
        return None  # loaded by this process already (its operators register once)
    try:
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as e:
        return f"{target} did not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None
