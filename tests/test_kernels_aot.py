"""Every Triton kernel compiles for real GPUs — sm_80 (A100), sm_90 (H100 / H200), sm_100 (B200) — without one.

:mod:`p2o_lightning.kernels.aot` compiles ``@triton.jit`` kernels to cubins with the ``ptxas`` Triton ships, in a
subprocess (this suite runs the kernels in the interpreter, and AOT needs them compiled), and reads back registers,
spills and shared memory. The limits asserted here are the hardware's and the kernels' design: shared memory within
the architecture's per-block maximum; no spill in the log-prob, loss and fused-head kernels; the log-prob matmuls on
tensor cores (``wgmma`` on sm_90, ``tcgen05`` on sm_100, ``mma`` on sm_80) for 16-bit inputs.

The same tests run over two sets of rows. By default, ``first``: every kernel in every dtype, its first launch
config at the heaviest features, for sm_90 (:func:`~p2o_lightning.kernels.aot.first_cases`; ~25 s cold for all three).
Under the ``aot_sweep`` marker, which the default run deselects (``pytest -m aot_sweep``; ``.ci/run`` runs it as its
second step), ``sweep``: every launch config × dtype, plus each feature constexpr's other values — the cases a launcher
or the autotuner can choose — for the three architectures, and the measured tuning's extra candidates for sm_90. The
compiles go to Triton's on-disk cache under the project cache (``$P2O_CACHE`` or ``~/.cache/p2o_lightning``)/triton-aot,
so a rerun with unchanged kernels takes seconds.
``benchmarks/aot_kernels.py`` writes the sweep's rows as the committed table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# not importorskip: importing triton here, at collection, would come before test_kernels.py sets TRITON_INTERPRET
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def aot_cache_dir() -> Path:
    return Path(os.environ.get("P2O_CACHE", Path.home() / ".cache" / "p2o_lightning")) / "triton-aot"


@pytest.fixture(scope="module", params=["first", pytest.param("sweep", marks=pytest.mark.aot_sweep)])
def rows(request, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "aot.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(aot_cache_dir()))
    command = [sys.executable, "-m", "p2o_lightning.kernels.catalog", "--out", str(out)]
    # the default run: one case a dtype for sm_90 (seconds cold); the sweep: every case for sm_80 / 90 / 100
    command += ["--first-cases", "--archs", "90"] if request.param == "first" else []
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def offenders(rows: list[dict], bad) -> list[str]:
    return [f"sm_{r['arch']} {r['case']}" for r in rows if bad(r)]


def test_every_case_compiles_for_every_arch(rows):
    archs = {r["arch"] for r in rows}
    assert archs in ({90}, {80, 90, 100})  # the default run's arch, or the sweep's three
    errors = [f"sm_{r['arch']} {r['case']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {
        "logprob_forward", "logprob_backward", "policy_loss_forward", "policy_loss_backward", "policy_loss_finalize",
        "group_advantage", "fused_head",
    }  # fmt: skip
    for kernel in kernels:  # every dtype of every kernel, on every arch
        dtypes = {(r["arch"], r["dtype"]) for r in rows if r["kernel"] == kernel}
        assert len(dtypes) == len(archs) * len({d for _, d in dtypes}), kernel


def test_shared_memory_within_the_per_block_limit(rows):
    from p2o_lightning.kernels.aot import ARCHS

    assert not offenders(rows, lambda r: r["shared_bytes"] > ARCHS[r["arch"]][1])


def test_no_spills_in_the_logprob_loss_and_fused_head_kernels(rows):
    hot = [r for r in rows if r["kernel"].startswith(("logprob", "policy_loss", "fused_head"))]
    assert hot
    assert not offenders(hot, lambda r: r["stack_bytes"] or r["local_bytes"])  # spills live in the stack frame
    assert not offenders(hot, lambda r: r["registers"] > 255)


def test_matmuls_run_on_tensor_cores(rows):
    want = {80: "mma", 90: "wgmma", 100: "tcgen05"}
    matmuls = [r for r in rows if r["matmul"] and r["dtype"] in ("bf16", "fp16")]
    assert {r["arch"] for r in matmuls} == {r["arch"] for r in rows}  # every arch compiled has 16-bit matmuls
    assert not offenders(matmuls, lambda r: r["tensor_op"] != want[r["arch"]])
    # fp32 tiles multiply in full precision (input_precision="ieee", as torch's matmul): FMA, no tensor-core op
    assert not offenders([r for r in rows if r["matmul"] and r["dtype"] == "fp32"], lambda r: r["tensor_op"] != "none")


def test_a_kernel_constexpr_missing_from_its_space_is_named():
    """check_space fails on a space that forgets a constexpr (what a new kernel option without AOT rows would be)."""
    code = (
        "import dataclasses\n"
        "from p2o_lightning.kernels import aot, catalog\n"
        "space = next(s for s in catalog.spaces() if s.name == 'policy_loss_forward')\n"
        "feats = {k: v for k, v in space.features.items() if k != 'PG_ONLY'}\n"
        "aot.check_space(dataclasses.replace(space, features=feats))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "policy_loss_forward: the launch space does not match the kernel's constexprs: missing ['PG_ONLY']" in (
        proc.stderr
    )


def test_occupancy_from_registers_and_shared_memory():
    from p2o_lightning.kernels.tuning import GPUS, occupancy

    h100 = GPUS["H100"]
    # 186 registers → 192 allocated × 256 threads = 49,152 of 65,536: one program; 72 KiB of 227 would allow 3
    assert occupancy(h100, 186, 72 * 1024, 8) == 1
    # 79 registers → 80 × 256 = 20,480: 3 programs by registers; 72 KiB: 3 by shared memory
    assert occupancy(h100, 79, 72 * 1024, 8) == 3
    assert occupancy(h100, 64, 0, 4) == 8  # 64 × 128 = 8,192 registers a program: 8 (the warps would allow 16)
    assert occupancy(GPUS["A100"], 64, 100 * 1024, 4) == 1  # 164 KiB per SM: one 100 KiB block


def test_autotune_times_the_configs_the_model_ranks_first():
    """On CPU, without the interpreter: the autotuner and the perf model agree on argument names, and the model's
    ranking (what autotune's top_k keeps) comes from the AOT resources of each config."""
    code = """
import json, torch
from p2o_lightning.kernels import logprob, tuning
tuning._device_gpu = lambda: tuning.GPUS["H100"]
fwd = logprob._tuned("forward", torch.bfloat16)
class Hidden:
    dtype = torch.bfloat16
pruned = fwd.early_config_prune(fwd.configs, {}, C_PAD=2)
n_splits, cols_per_split = logprob.split_plan(16384, 151936, 2, tuning.GPUS["H100"].sms)
args = dict(H_ptr=Hidden(), N=16384, V=151936, H=4096, C=2, C_PAD=2, ENTROPY=True, n_splits=n_splits,
            cols_per_split=cols_per_split)
print(json.dumps({"keys": fwd.keys, "top_k": fwd.configs_top_k, "n_configs": len(fwd.configs),
                  "block_n": [c.kwargs["BLOCK_N"] for c in pruned],
                  "ms": [fwd.perf_model(**args, **c.all_kwargs()) for c in pruned]}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(aot_cache_dir()))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    from p2o_lightning.kernels.logprob import FORWARD_CONFIGS, TOP_K

    configs = FORWARD_CONFIGS[torch.bfloat16]
    assert out["keys"] == ["V", "H", "C_PAD", "ENTROPY"] and out["top_k"] == TOP_K < out["n_configs"] == len(configs)
    assert out["block_n"] == [max(16, c["BLOCK_N"] // 2) for c in configs]  # two contexts: half the rows each
    assert all(0 < ms < 1e4 for ms in out["ms"]) and len(set(out["ms"])) > 1  # finite, and it tells configs apart


@pytest.mark.aot_sweep
def test_tuning_candidates_compile_for_sm_90():
    """The configs only the measured tuning times (larger tiles, cut-cross-entropy's among them) compile for sm_90
    with H divisible by BLOCK_H (EVEN_H), one context: wgmma, shared memory within the limit. Their registers and
    spills are the measurement's business (benchmarks/tune_logprob.py), not asserted here."""
    code = """
import json
from p2o_lightning.kernels import aot, logprob
rows = []
for space, configs in ((logprob.FORWARD_SPACE, logprob.FORWARD_CANDIDATES),
                       (logprob.BACKWARD_SPACE, logprob.BACKWARD_CANDIDATES)):
    for config in configs:
        feats = {"EVEN_H": True, "ENTROPY": False} | ({"C_PAD": 1} if space is logprob.FORWARD_SPACE else {})
        res = aot.compile_case(aot.find_case(space, "bf16", config, feats), 90)
        rows.append(dict(kernel=space.name, config=config, registers=res.registers, stack=res.stack_bytes,
                         shared=res.shared_bytes, tensor_op=res.tensor_op))
print(json.dumps(rows))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(aot_cache_dir()))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    from p2o_lightning.kernels.aot import ARCHS
    from p2o_lightning.kernels.logprob import BACKWARD_CANDIDATES, FORWARD_CANDIDATES

    assert len(rows) == len(FORWARD_CANDIDATES) + len(BACKWARD_CANDIDATES)
    assert all(r["tensor_op"] == "wgmma" for r in rows), rows
    assert all(0 < r["shared"] <= ARCHS[90][1] for r in rows), rows
