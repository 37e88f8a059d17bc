"""Provide a real ``llama-server`` binary, building it from a pinned source when not cached.

No registry ships a llama-server binary, but PyPI's ``llama-cpp-python`` sdist carries the
llama.cpp source under ``vendor/llama.cpp``. We build only the ``llama-server`` target and
cache the result outside the repository, keyed by the sdist version, so a warm run costs
nothing. ``PADDLER_LLAMA_SERVER`` points at an existing binary instead.

Run ``python -m devstack.llamacpp_build`` to build (progress goes to stderr) and print the path.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BINARY_ENV = "PADDLER_LLAMA_SERVER"
CACHE_ENV = "PADDLER_CACHE_DIR"

_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]


class BuildError(RuntimeError):
    """The llama-server binary could not be provided."""


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "paddler-haproxy")
    return Path(base)


def cached_binary_path(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_dir() / f"llama-server-{version}" / "llama-server"


def llama_server_binary(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Return a runnable llama-server: the env override, the cache, or a fresh build."""
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BuildError(f"{BINARY_ENV}={override} is not an executable file")
        return path
    target = cached_binary_path(version)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (e.g. the demo and a test run) must not build into the same place at once.
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _build(version, target)
    return target


def _log(message: str) -> None:
    print(f"[llama-server build] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    _log("$ " + " ".join(cmd))
    # The tool's own output (cmake's "[ 42%] Building ..." lines) is the progress report; it goes
    # to stderr because stdout carries only the binary's path.
    proc = subprocess.run(cmd, cwd=cwd, stdout=sys.stderr)
    if proc.returncode != 0:
        raise BuildError(f"command failed with status {proc.returncode}: {' '.join(cmd)}")


def _build(version: str, target: Path) -> None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"building llama-server needs {tool!r} on PATH (apt-get install cmake g++)")
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        work = Path(tmp)
        _log(f"downloading llama-cpp-python=={version} source (carries llama.cpp)")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", str(work)])
        sdists = list(work.glob("llama_cpp_python-*.tar.gz"))
        if len(sdists) != 1:
            raise BuildError(f"expected one sdist in {work}, found {sdists}")
        with tarfile.open(sdists[0]) as archive:
            archive.extractall(work, filter="data")
        source = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        if not (source / "CMakeLists.txt").is_file():
            raise BuildError(f"no llama.cpp source at {source}")
        build = source / "build"
        _log("configuring (cmake); the build takes about 6 minutes on 2 cores")
        _run(["cmake", "-S", str(source), "-B", str(build), *_CMAKE_FLAGS])
        jobs = str(os.cpu_count() or 2)
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs])
        built = build / "bin" / "llama-server"
        if not built.is_file():
            raise BuildError(f"build finished but {built} is missing")
        staging = target.with_suffix(".partial")
        shutil.copy2(built, staging)
        staging.replace(target)
        _log(f"cached at {target}")


def main() -> int:
    try:
        print(llama_server_binary())
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
