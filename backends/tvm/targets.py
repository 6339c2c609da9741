"""Target presets and parsing of `--target`.

    host                 the CPU of this machine (LLVM picks its features)
    rasp4b               Raspberry Pi 4B, 64-bit OS: aarch64 Cortex-A72, NEON
    rasp5                Raspberry Pi 5: aarch64 Cortex-A76, NEON + dot product (sdot/udot)
    rasp3b               Raspberry Pi 3B, 32-bit OS: armv7 hard-float, Cortex-A53, NEON
    cuda[:arch=sm_XX]    NVIDIA GPU (default sm_80); host code for this machine
    {"kind": ...}        any TVM target as JSON (cross-compiled when it names an ARM mtriple)

A `TargetSpec` carries the TVM target JSON and how to link for it: the cross compiler (a Debian
package on this machine) for ARM boards, the native gcc otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass

from ir import CompressError

__all__ = ["TargetSpec", "parse_target", "PRESETS", "CROSS_TOOLCHAINS"]

# mtriple prefix -> (compiler executable, Debian package that provides it)
CROSS_TOOLCHAINS = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    "armv7": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
}

PRESETS = {
    "rasp4b": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
               "mattr": ["+neon"], "num-cores": 4},
    "rasp5": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
              "mattr": ["+neon", "+dotprod"], "num-cores": 4},
    "rasp3b": {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mcpu": "cortex-a53",
               "mattr": ["+neon", "+vfp4"], "num-cores": 4},
}
DEFAULT_CUDA_ARCH = "sm_80"


@dataclass(frozen=True)
class TargetSpec:
    """A parsed --target: `name` (preset or "custom"), `config` (TVM target JSON dict)."""
    name: str
    config: dict

    @property
    def is_gpu(self) -> bool:
        return self.config.get("kind") in ("cuda", "rocm", "vulkan", "opencl", "metal")

    @property
    def device(self) -> str:
        """The runtime device name the runner opens ("cpu" or "cuda")."""
        return "cuda" if self.config.get("kind") == "cuda" else "cpu"

    def tvm_target(self):
        import tvm
        try:
            if self.is_gpu:
                config = {k: v for k, v in self.config.items() if k != "host"}
                host = self.config.get("host", host_config())
                return tvm.target.Target(config, host=host)
            return tvm.target.Target(self.config)
        except Exception as exc:  # TVM rejects unknown kinds/keys with a multi-line error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompressError(f"bad TVM target {json.dumps(self.config)}: {first}") from None

    @property
    def cross_toolchain(self) -> tuple[str, str] | None:
        """(compiler, Debian package) when the code must be cross-compiled, else None."""
        triple = self.config.get("mtriple", "") if not self.is_gpu else ""
        arch = triple.split("-")[0]
        if not arch or _native_arch(arch):
            return None
        for prefix, toolchain in CROSS_TOOLCHAINS.items():
            if arch.startswith(prefix):
                return toolchain
        raise CompressError(f"no cross compiler known for mtriple {triple!r}; "
                            f"known: {', '.join(CROSS_TOOLCHAINS)}")

    def compiler(self) -> str:
        """The C compiler that links the library; a clear error when it is not installed."""
        toolchain = self.cross_toolchain
        if toolchain is None:
            return "g++" if shutil.which("g++") else "gcc"
        cc, package = toolchain
        if shutil.which(cc) is None:
            raise CompressError(f"cross compiler {cc} not found for target {self.name}: install "
                                f"the Debian package {package} (apt-get install -y {package})")
        return cc

    @property
    def runs_here(self) -> bool:
        """Whether code for this target can run (and be measured) on this machine."""
        return not self.is_gpu and self.cross_toolchain is None

    def key(self) -> str:
        """A short stable hash of the target, for per-target caches (tuning databases)."""
        text = json.dumps(self.config, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _native_arch(arch: str) -> bool:
    machine = platform.machine().lower()
    return arch == machine or (arch.startswith("x86_64") and machine in ("x86_64", "amd64"))


def host_config() -> dict:
    """The CPU of this machine, with the exact CPU model so LLVM uses its vector units."""
    from tvm.target import codegen
    config = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    cpu = codegen.llvm_get_system_cpu()
    if cpu and cpu != "generic":
        config["mcpu"] = cpu
    return config


def parse_target(text: str) -> TargetSpec:
    """A TargetSpec from a --target string (see module doc); CompressError when it is bad."""
    text = (text or "").strip()
    if not text:
        raise CompressError("empty --target; use host, rasp4b, rasp5, rasp3b, cuda[:arch=sm_XX] "
                            "or a TVM target JSON")
    if text.startswith("{"):
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CompressError(f"--target is not valid JSON: {exc.msg} at column {exc.colno}") \
                from None
        if not isinstance(config, dict) or "kind" not in config:
            raise CompressError('--target JSON must be an object with a "kind", e.g. '
                                '{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}')
        spec = TargetSpec("custom", config)
        spec.tvm_target()  # validate now, before any slow work
        return spec
    name, _, options = text.partition(":")
    opts = _parse_options(options, text)
    if name == "host":
        _no_options(name, opts)
        return TargetSpec("host", host_config())
    if name in PRESETS:
        _no_options(name, opts)
        return TargetSpec(name, dict(PRESETS[name]))
    if name == "cuda":
        arch = opts.pop("arch", DEFAULT_CUDA_ARCH)
        _no_options(name, opts)
        if not (arch.startswith("sm_") and arch[3:].isdigit()):
            raise CompressError(f"bad CUDA arch {arch!r} in --target {text!r}; expected sm_XX, "
                                "e.g. cuda:arch=sm_86")
        return TargetSpec("cuda", {"kind": "cuda", "arch": arch})
    raise CompressError(f"unknown --target {name!r}; use host, rasp4b, rasp5, rasp3b, "
                        "cuda[:arch=sm_XX] or a TVM target JSON")


def _parse_options(options: str, text: str) -> dict[str, str]:
    found = {}
    for item in filter(None, options.split(":")):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise CompressError(f"bad option {item!r} in --target {text!r}; expected key=value")
        found[key] = value
    return found


def _no_options(name: str, opts: dict) -> None:
    if opts:
        raise CompressError(f"--target {name} takes no option {', '.join(sorted(opts))!s}")
