"""Build the C++ kernels at first use and cache the library on disk.

The library is compiled with ``torch.utils.cpp_extension`` into a directory named by a hash of
the sources, the torch version, the compiler and the flags, under ``$ZAYA_KERNELS_CACHE`` (default
``$XDG_CACHE_HOME/zaya/kernels`` or ``~/.cache/zaya/kernels``). A later start finds the library
there and loads it directly, without asking the build system. The sources register their operators
with ``TORCH_LIBRARY`` (``torch.ops.zaya.*``), so the library is loaded as a plain shared object,
with no Python module.

``ZAYA_KERNELS=0`` disables the kernels (callers take the PyTorch reference path);
``ZAYA_KERNELS_ISA=portable`` keeps the library but skips its AVX-512 loops.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from zaya.kernels import fake

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ops.cpp", "gemv_avx512.cpp", "gemv_portable.cpp", "fused.cpp")
HEADERS = ("kernels.h", "prep.h")
CFLAGS = ("-O3", "-fopenmp", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)
LIB_NAME = "zaya_kernels"

_lock = threading.Lock()
_state: dict = {}


def user_cache_dir(name: str, override: str) -> Path:
    """``$override`` if set, else ``$XDG_CACHE_HOME/zaya/name`` (``~/.cache`` by default): where
    zaya keeps build artifacts (the kernels here, Inductor's graphs for the compiled step)."""
    if os.environ.get(override):
        return Path(os.environ[override])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zaya" / name


def cache_root() -> Path:
    return user_cache_dir("kernels", "ZAYA_KERNELS_CACHE")


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH)")
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    return cxx + "\n" + out.stdout.splitlines()[0] if out.stdout else cxx


def build_key() -> str:
    """Hash of everything the library's bytes depend on."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    for part in (torch.__version__, _compiler_id(), " ".join(CFLAGS + LDFLAGS), platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _load_or_build() -> Path:
    directory = cache_root() / build_key()
    lib = directory / f"{LIB_NAME}.so"
    if not lib.exists() or (directory / "lock").exists():  # absent, or another process is still building it
        from torch.utils import cpp_extension  # imports setuptools: only when building

        directory.mkdir(parents=True, exist_ok=True)
        # cpp_extension locks the directory, so concurrent first starts build once; it loads the
        # library it built into this process
        cpp_extension.load(name=LIB_NAME, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), build_directory=str(directory), is_python_module=False)
    else:
        torch.ops.load_library(str(lib))
    return lib


def load() -> bool:
    """Load (building on first use) the compiled kernels; False, with one warning, when impossible."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        if os.environ.get("ZAYA_KERNELS", "1") == "0":
            _state.update(ok=False, reason="disabled by ZAYA_KERNELS=0")
            return False
        try:
            _state["lib"] = _load_or_build()
            fake.register()
            _state["ok"] = True
        except Exception as e:  # no compiler, a failed build, a library that does not load
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _state.update(ok=False, reason=f"{type(e).__name__}: {first}")
            warnings.warn(f"zaya.kernels: compiled kernels unavailable ({_state['reason']}); "
                          "using the PyTorch reference path", RuntimeWarning, stacklevel=3)
        return _state["ok"]


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not in use (None when they are)."""
    return None if load() else _state["reason"]
