"""Ahead-of-time compilation of every kernel for real GPUs, on a machine without one.

Triton's wheel ships ``ptxas`` (and ``ptxas-blackwell``), ``cuobjdump`` and ``nvdisasm``, so
``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))`` produces the
cubin a GPU would run, with no driver. A :class:`KernelSpace` is the *launch space* of one ``@triton.jit`` kernel —
the launch configs its launcher can choose (the very tuples the launchers and ``triton.autotune`` use), the dtypes
it supports and the values of its feature constexprs; each kernel module declares its spaces next to its kernels
(``SPACES`` of :mod:`.logprob`, :mod:`.loss`, :mod:`.advantage`, gathered by :mod:`.catalog`). This module compiles
a space's cases and reads back what the hardware would be asked for: registers per thread, spilled bytes (local
memory), shared memory per block, the stack frame (where ptxas puts spilled registers: ``ptxas -v`` reports "N bytes
stack frame, N bytes spill stores" together for these kernels, which have no calls or local arrays), and whether the
matmuls became ``wgmma`` (sm_90) / ``tcgen05`` (sm_100) / ``mma`` (sm_80). It imports no kernel module.

Cases of a space: every launch config × every dtype with the features at their heaviest setting (the first value
of each, the most code), plus every other feature value one at a time on the first config and dtype. A constexpr
of a kernel that its space does not name is an error (:func:`check_space`), so a new one cannot slip past the test.

Used by ``tests/test_kernels_aot.py`` (the limits, through ``python -m p2o_lightning.kernels.catalog``),
``benchmarks/aot_kernels.py`` (the committed table) and the launch-config model of :mod:`.tuning` (occupancy from
registers and shared memory). Pointers are compiled as 16-byte aligned and the integer arguments marked ``aligned``
as multiples of 16, as a launch on torch tensors with H a multiple of 16 specialises them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _guard  # noqa: F401  (refuses the top-level name `kernels`)

__all__ = [
    "ARCHS", "Case", "KernelSpace", "Resources", "cases", "check_space", "compile_all", "compile_case", "find_case",
    "first_cases",
]  # fmt: skip

# arch → (name, largest shared memory per block in bytes, with the opt-in) — CUDA programming guide, table 23
ARCHS = {
    80: ("sm_80 (A100)", 166912),
    90: ("sm_90 (H100 / H200)", 232448),
    100: ("sm_100 (B200)", 232448),
}
LAUNCH_KEYS = ("num_warps", "num_stages")
TL_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp64": "fp64"}


@dataclasses.dataclass(frozen=True)
class KernelSpace:
    """Everything a launcher may pass a kernel, declared once.

    ``pointers``: pointer argument → its element type, or "in" (the case's dtype) / "compute" (the dtype's compute
    type). ``scalars``: non-pointer arguments that are not i32 (e.g. "fp32"). ``aligned``: i32 arguments that are
    multiples of 16 in practice. ``configs``: the launcher's launch configs (constexprs + num_warps / num_stages),
    or a dict dtype name → configs where they differ by dtype.
    ``dtypes``: dtype name → (compute type, the constexprs it implies). ``features``: constexpr → values, the heaviest
    first. ``adapt``: maps (config, features) to the constexprs launched (e.g. rows per context). ``matmul``: the
    kernel's ``tl.dot`` must run on tensor cores for 16-bit dtypes.
    """

    name: str
    kernel: Callable
    pointers: dict[str, str]
    configs: tuple[dict, ...] | dict[str, tuple[dict, ...]]
    dtypes: dict[str, tuple[str, dict]]
    features: dict[str, tuple] = dataclasses.field(default_factory=dict)
    scalars: dict[str, str] = dataclasses.field(default_factory=dict)
    aligned: tuple[str, ...] = ()
    adapt: Callable[[dict, dict], dict] | None = None
    matmul: bool = False

    def configs_for(self, dtype: str) -> tuple[dict, ...]:
        return self.configs[dtype] if isinstance(self.configs, dict) else self.configs


@dataclasses.dataclass(frozen=True)
class Case:
    space: KernelSpace
    config: dict  # launch constexprs + num_warps / num_stages, after ``adapt``
    dtype: str
    features: dict

    @property
    def label(self) -> str:
        cfg = "-".join(f"{k}{v}" for k, v in self.config.items())
        feats = "-".join(f"{k}{_short(v)}" for k, v in self.features.items())
        return f"{self.space.name}[{self.dtype}|{cfg}|{feats}]"


@dataclasses.dataclass(frozen=True)
class Resources:
    arch: int
    registers: int  # per thread (cuobjdump -res-usage REG)
    stack_bytes: int  # the stack frame per thread (STACK): register spills, as no kernel here calls or has arrays
    local_bytes: int  # other local memory per thread (LOCAL)
    shared_bytes: int  # shared memory per block (the compiled kernel's metadata: static + dynamic)
    num_warps: int
    tensor_op: str  # "wgmma" | "tcgen05" | "mma" | "none": what the matmuls became
    compile_s: float


def _short(v) -> str:
    return str(v).replace("tl.", "").replace("triton.language.", "")


def _kernels_loaded_compiled() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs the compiled kernels: unset TRITON_INTERPRET (run in a subprocess)")


def check_space(space: KernelSpace) -> None:
    """Raise ValueError naming every constexpr of the kernel that the space does not set, or sets twice."""
    constexprs = [p.name for p in space.kernel.params if p.is_constexpr]
    set_by = {}
    for source, names in (
        ("configs", {k for d in space.dtypes for c in space.configs_for(d) for k in c if k not in LAUNCH_KEYS}),
        ("dtypes", {k for _, c in space.dtypes.values() for k in c}),
        ("features", set(space.features)),
    ):
        for name in names:
            if name in set_by:
                raise ValueError(f"{space.name}: constexpr {name} is set by both {set_by[name]} and {source}")
            set_by[name] = source
    missing = [n for n in constexprs if n not in set_by]
    unknown = [n for n in set_by if n not in constexprs]
    if missing or unknown:
        raise ValueError(
            f"{space.name}: the launch space does not match the kernel's constexprs: missing {missing}, unknown "
            f"{unknown}; declare every constexpr a launcher can pass in the kernel's SPACES, next to it"
        )


def cases(space: KernelSpace) -> Iterator[Case]:
    """Every config × dtype at the heaviest features, then each other feature value on the first dtype's first config
    (a feature only removes or swaps code; the configs and dtypes are what move registers and shared memory).
    """
    heaviest = {k: v[0] for k, v in space.features.items()}
    variants = [dict(heaviest, **{k: v}) for k, vs in space.features.items() for v in vs[1:]]
    seen = set()
    for feats, config, dtype in itertools.chain(
        ((heaviest, c, d) for d in space.dtypes for c in space.configs_for(d)),
        ((f, space.configs_for(first)[0], first) for first in list(space.dtypes)[:1] for f in variants),
    ):
        launched = space.adapt(dict(config), feats) if space.adapt else dict(config)
        key = (tuple(launched.items()), dtype, tuple(feats.items()))
        if key not in seen:
            seen.add(key)
            yield Case(space, launched, dtype, feats)


def first_cases(space: KernelSpace) -> Iterator[Case]:
    """One case a dtype: its first launch config, with the features at their heaviest (the first case :func:`cases`
    makes of that dtype). Every kernel in every dtype, a fraction of the sweep's compile time.
    """
    for dtype in space.dtypes:
        yield find_case(space, dtype, space.configs_for(dtype)[0], {})


def _signature(case: Case) -> tuple[dict, dict, dict]:
    space = case.space
    compute, dtype_constexprs = space.dtypes[case.dtype]
    constexprs = {k: v for k, v in case.config.items() if k not in LAUNCH_KEYS}
    constexprs.update(dtype_constexprs)
    constexprs.update(case.features)
    signature, attrs = {}, {}
    for i, p in enumerate(space.kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            continue
        if p.name in space.pointers:
            kind = space.pointers[p.name]
            signature[p.name] = {"in": "*" + TL_DTYPES[case.dtype], "compute": "*" + compute}.get(kind, kind)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = space.scalars.get(p.name, "i32")
            if p.name in space.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _nvidia_bin(name: str) -> str:
    from triton.backends.nvidia import compiler

    return str(Path(compiler.__file__).parent / "bin" / name)


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_case(case: Case, arch: int) -> Resources:
    """Compile ``case`` for ``sm_<arch>`` and read its resources (raises what the compiler raises)."""
    _kernels_loaded_compiled()
    signature, constexprs, attrs = _signature(case)
    options = {k: case.config[k] for k in LAUNCH_KEYS if k in case.config}
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(case.space.kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    match = _RES.search(usage.stdout)
    if usage.returncode != 0 or match is None:
        raise RuntimeError(f"cuobjdump -res-usage failed on {case.label}: {usage.stderr or usage.stdout}")
    regs, stack, _static_shared, local = (int(x) for x in match.groups())
    ptx = compiled.asm["ptx"]
    tensor_op = next((op for op in ("tcgen05.mma", "wgmma", "mma.sync") if op in ptx), "none").split(".")[0]
    return Resources(
        arch=arch, registers=regs, stack_bytes=stack, local_bytes=local, shared_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps, tensor_op=tensor_op, compile_s=seconds,
    )  # fmt: skip


def find_case(space: KernelSpace, dtype: str, config: dict, features: dict) -> Case:
    """The case of ``space`` with this dtype, launch config and features (the others at their heaviest)."""
    feats = {k: v[0] for k, v in space.features.items()} | features
    launched = space.adapt(dict(config), feats) if space.adapt else dict(config)
    return Case(space, launched, dtype, feats)


def ptxas_versions() -> dict[str, str]:
    """The ptxas releases the wheel ships (``ptxas``, and ``ptxas-blackwell`` for sm_100 when present)."""
    out = {}
    for name in ("ptxas", "ptxas-blackwell"):
        path = Path(_nvidia_bin(name))
        if path.exists():
            text = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
            match = re.search(r"release ([\d.]+)", text)
            out[name] = match.group(1) if match else "unknown"
    return out


def compile_all(
    spaces: tuple[KernelSpace, ...],
    archs: tuple[int, ...] = tuple(ARCHS),
    log: Callable[[str], None] | None = None,
    pick: Callable[[KernelSpace], Iterator[Case]] = cases,
) -> list[dict]:
    """Check every space, compile its cases (``pick``: every case, or :func:`first_cases`) for every arch; one row per
    (case, arch), ``error`` set on failure.

    A cold compile takes ~0.5 s (elementwise kernels) to ~3.5 s (the matmul kernels) per case and arch on one core;
    Triton's on-disk cache (``TRITON_CACHE_DIR``) makes a rerun of unchanged kernels take seconds.
    """
    _kernels_loaded_compiled()
    rows = []
    for space in spaces:
        check_space(space)
        for case in pick(space):
            for arch in archs:
                row = dict(kernel=space.name, dtype=case.dtype, arch=arch, case=case.label, matmul=space.matmul,
                           config=case.config, features={k: _short(v) for k, v in case.features.items()})  # fmt: skip
                try:
                    row.update(dataclasses.asdict(compile_case(case, arch)), error="")
                except Exception as err:  # report it as the case's row: the test names every failing case
                    row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                rows.append(row)
                if log:
                    log(
                        f"sm_{arch} {case.label}: "
                        + (row["error"] or f"{row['registers']} regs, {row['shared_bytes']} B")
                    )
    return rows
