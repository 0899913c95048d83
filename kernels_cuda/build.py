"""Compile the CPU build of the lattice kernels on first use and cache it.

The shared library is built with ``g++ -O3 -fopenmp -fPIC -shared`` (``$CXX`` overrides the
compiler) from ``sgp_lattice_cpu.cpp`` and the headers it includes, into
``$SCALEGP_CACHE`` (default ``~/.cache/scalegp``) under a name keyed by the hash of the sources,
the compiler and its flags, so an edited source is rebuilt and an unchanged one is compiled once
per machine. The write is atomic (temporary file + rename), so concurrent first uses are safe.

.. note:: Cost: one compile of a few seconds on first use; afterwards a hash of the sources.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["SOURCE_DIR", "CPU_SOURCES", "CUDA_SOURCES", "CXXFLAGS", "cache_dir", "cpu_library_path"]

SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = ("sgp_atomics.h", "sgp_lattice.h")
CPU_SOURCES = ("sgp_lattice_cpu.cpp",) + HEADERS
CUDA_SOURCES = ("sgp_lattice.cu",) + HEADERS
CXXFLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17")


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$SCALEGP_CACHE`` or ``~/.cache/scalegp``."""
    return Path(os.environ.get("SCALEGP_CACHE", Path.home() / ".cache" / "scalegp"))


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(
            f"kernels_cuda: no C++ compiler found (looked for {cxx!r} on PATH). The CPU lattice kernels "
            "are compiled on first use: install g++ (e.g. `apt-get install g++`) or set $CXX to an "
            "OpenMP-capable C++ compiler."
        )
    return path


def _source_hash(cxx: str) -> str:
    h = hashlib.sha256()
    for name in CPU_SOURCES:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(" ".join((cxx,) + CXXFLAGS).encode())
    return h.hexdigest()[:16]


def cpu_library_path() -> Path:
    """Path of the compiled CPU library, compiling it first if the cache lacks this version."""
    cxx = _compiler()
    target = cache_dir() / f"libsgp_lattice_{_source_hash(cxx)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, "-o", tmp, str(SOURCE_DIR / "sgp_lattice_cpu.cpp")]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                f"kernels_cuda: compiling the CPU lattice kernels failed:\n{' '.join(cmd)}\n{res.stderr}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
