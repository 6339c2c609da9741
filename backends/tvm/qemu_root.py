"""Prepare an aarch64 Python root so rasp4b/rasp5 artifacts run here under qemu-user.

    python -m backends.tvm.qemu_root [--root DIR] [--force]      # prints the root path
    python -m backends.tvm.qemu_root --run ART_DIR --input x.npy --output y.npy

The root holds Debian bookworm's arm64 Python 3.11 (`python3.11-minimal`,
`libpython3.11-stdlib` and the shared libraries they load) unpacked with `dpkg -x`, and the
aarch64 manylinux wheels of apache-tvm / apache-tvm-ffi / numpy unzipped into `ROOT/site`.
Then `qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11` with `PYTHONPATH=ROOT/site` is an
aarch64 Python that can import tvm (slowly: about 20 s under emulation).

Downloads happen once (network needed then): apt runs with a private package-list directory
and `APT::Architecture=arm64`, so the host's dpkg configuration is not changed (no
`dpkg --add-architecture`). A stamp file marks a complete root; later calls return at once.
Needs: apt-get, dpkg, pip, and `apt-get install -y qemu-user` to run anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["default_root", "ensure_root", "python_command", "QemuRootError"]

# Debian arm64 packages: the interpreter, its stdlib and every shared library that the
# interpreter, its extension modules, tvm's libtvm_runtime and numpy load.
DEBIAN_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libgcc-s1", "libstdc++6", "libexpat1", "zlib1g", "libffi8", "libssl3",
    "libbz2-1.0", "liblzma5", "libsqlite3-0", "libcrypt1", "libuuid1", "libdb5.3",
    "libncursesw6", "libtinfo6", "libreadline8", "libnsl2", "libtirpc3", "libzstd1",
)
# tvm and its runtime requirements, at the host's versions where installed (the artifact is
# built by the host's TVM; the runtime must match it).
WHEELS = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1", "numpy": None,
          "ml_dtypes": None, "typing_extensions": None}


def _wheel_specs() -> list[str]:
    from importlib import metadata
    specs = []
    for name, pinned in WHEELS.items():
        try:
            version = pinned or metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        specs.append(f"{name}=={version}" if version else name)
    return specs
STAMP = ".graph-compress-root-complete"


class QemuRootError(RuntimeError):
    """A step of preparing the root failed (message says which)."""


def default_root() -> Path:
    cache = Path(os.environ.get("GRAPH_COMPRESS_CACHE",
                                Path.home() / ".cache" / "graph-compress"))
    return cache / "qemu-aarch64-root"


def _run(cmd, cwd=None):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise QemuRootError(f"{' '.join(map(str, cmd[:4]))} ... failed: " + " | ".join(tail))
    return result.stdout


def _download_debs(dest: Path, apt_state: Path) -> list[Path]:
    """apt-get download the arm64 packages with a private list directory (no host change)."""
    (apt_state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_state / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    options = ["-q", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
               "-o", f"Dir::State::Lists={apt_state / 'lists'}", "-o", f"Dir::Cache={apt_state}",
               "-o", "APT::Sandbox::User=root"]
    _run(["apt-get", *options, "update"])
    _run(["apt-get", *options, "download", *DEBIAN_PACKAGES], cwd=dest)
    return sorted(dest.glob("*.deb"))


def _download_wheels(dest: Path) -> list[Path]:
    _run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
          "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_17_aarch64",
          "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
          "--implementation", "cp", "-d", str(dest), *_wheel_specs()])
    return sorted(dest.glob("*.whl"))


def python_command(root: Path) -> list[str]:
    """The argv prefix that runs the aarch64 interpreter (PYTHONPATH: see python_env)."""
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        raise QemuRootError("qemu-aarch64 not found: apt-get install -y qemu-user")
    return [qemu, "-L", str(root), str(root / "usr" / "bin" / "python3.11")]


def python_env(root: Path, extra_path: str | None = None) -> dict:
    paths = [str(root / "site")] + ([extra_path] if extra_path else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONNOUSERSITE": "1"}


def ensure_root(root: Path | None = None, force: bool = False, log=print) -> Path:
    """Build the root if it is not complete yet; returns its path."""
    root = Path(root) if root else default_root()
    if (root / STAMP).exists() and not force:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as work:
        work = Path(work)
        staging = work / "root"
        (staging / "site").mkdir(parents=True)
        (work / "debs").mkdir()
        (work / "wheels").mkdir()
        log("downloading arm64 Debian packages ...")
        debs = _download_debs(work / "debs", root.parent / "qemu-aarch64-apt")
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(staging)])
        log(f"unpacked {len(debs)} packages; downloading aarch64 wheels ...")
        for wheel in _download_wheels(work / "wheels"):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(staging / "site")
        # zipfile drops the executable bits; shared objects do not need them, scripts unused.
        staging.rename(root)
    log("checking: import tvm under qemu (about 20 s) ...")
    probe = subprocess.run(python_command(root) + ["-c", "import numpy, tvm; print(tvm.__version__)"],
                           env=python_env(root), capture_output=True, text=True, timeout=900)
    if probe.returncode != 0:
        raise QemuRootError("the aarch64 python cannot import tvm: "
                            + " | ".join(probe.stderr.strip().splitlines()[-3:]))
    (root / STAMP).write_text(probe.stdout)
    log(f"ready: {root} (tvm {probe.stdout.strip()})")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.tvm.qemu_root",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help=f"default: {default_root()}")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    parser.add_argument("--run", metavar="ART_DIR",
                        help="then run this artifact's run.py under qemu; other arguments go "
                             "to the runner (--input, --output, --bench)")
    args, rest = parser.parse_known_args(argv)
    try:
        root = ensure_root(args.root, args.force, log=lambda m: print(m, file=sys.stderr))
        if not args.run:
            print(root)
            return 0
        runner = Path(args.run) / "run.py"
        return subprocess.run(python_command(root) + [str(runner), args.run, *rest],
                              env=python_env(root)).returncode
    except QemuRootError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
