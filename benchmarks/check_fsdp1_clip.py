"""The FSDP1 gradient-clipping path (:func:`p2o_lightning.optim.clip_grad_norm` with an FSDP1 root) on one GPU.

Under Lightning's ``FSDPStrategy`` (FSDP1) the module's optimizer step clips through the wrapped root's
``clip_grad_norm_`` (:meth:`p2o_lightning.optim.OptimizerStep.clip`); the CPU tests only see a stand-in root,
because FSDP1 needs an accelerator. This check runs the real thing on one CUDA device, two ways:

1. ``direct``: the embedded world's model wrapped in ``FullyShardedDataParallel`` (one rank, NCCL,
   ``use_orig_params=True`` as Lightning wraps it) and an unwrapped copy, one loss and backward each on the same
   batch; then ``clip_grad_norm(params, max_norm, fsdp_root)`` against ``clip_grad_norm(params, max_norm)``: the norms
   before clipping and every clipped gradient must agree (float32, rtol 1e-5).
2. ``trainer``: ``python -m p2o_lightning fit`` of ``configs/toy.yaml`` for ``--steps`` RL steps with
   ``--trainer.strategy fsdp`` and again with ``auto``, ``max_grad_norm`` 1.0, same seed: both must finish, and the
   logged gradient norms are printed side by side with their relative difference.

    python benchmarks/check_fsdp1_clip.py [--steps 3] [--out DIR]
    python benchmarks/check_fsdp1_clip.py --dry-run     # CPU: the unwrapped half, and both fit commands' configs

``--dry-run`` (CPU): torch refuses FSDP1 without an accelerator, so it runs the unwrapped half of ``direct`` and
checks the two ``fit`` command lines with ``--print_config`` (parsed, not run). Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MAX_NORM = 1.0
MAX_NORM_DIRECT = 0.05  # below the model's gradient norm: the clip must act


def model_and_batch(device: torch.device):
    from transformers import AutoModelForCausalLM

    from p2o_lightning.tasks.shipped_world import shipped_world

    model = AutoModelForCausalLM.from_pretrained(shipped_world(), dtype=torch.float32).to(device)
    gen = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 24), device=device, generator=gen)
    return model, ids


def direct(device: torch.device, dry_run: bool) -> dict:
    """Clip an FSDP1-wrapped model and an unwrapped copy after the same backward; compare norms and gradients."""
    from p2o_lightning.optim import clip_grad_norm

    model, ids = model_and_batch(device)
    plain = copy.deepcopy(model)
    plain(ids, labels=ids).loss.backward()
    norm_plain = clip_grad_norm([p for p in plain.parameters() if p.grad is not None], MAX_NORM_DIRECT)
    if dry_run:
        return {"check": "direct", "status": "dry run: FSDP1 needs an accelerator; the unwrapped half ran",
                "norm_plain": norm_plain}  # fmt: skip

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            wrapped = FullyShardedDataParallel(model, device_id=device, use_orig_params=True)
            wrapped(ids, labels=ids).loss.backward()
            params = [p for p in wrapped.parameters() if p.grad is not None]
            norm_fsdp = clip_grad_norm(params, MAX_NORM_DIRECT, fsdp_root=wrapped)
            with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
                grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in wrapped.named_parameters()
                         if p.grad is not None}  # fmt: skip
        finally:
            dist.destroy_process_group()
    want = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    missing = sorted(set(want) - set(grads))
    worst = max((((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in want.items()
                 if n in grads), default=float("inf"))  # fmt: skip
    ok = not missing and abs(norm_fsdp - norm_plain) <= 1e-5 * norm_plain and worst <= 1e-5
    return {"check": "direct", "status": "ok" if ok else "failed", "norm_fsdp": norm_fsdp, "norm_plain": norm_plain,
            "max_rel_grad_diff": worst, "missing_grads": missing[:5]}  # fmt: skip


def fit_command(strategy: str, steps: int, out: Path, dry_run: bool) -> list[str]:
    command = [
        sys.executable, "-m", "p2o_lightning", "fit", "--config", str(REPO / "configs" / "toy.yaml"),
        "--trainer.accelerator", "cpu" if dry_run else "gpu", "--trainer.devices", "1",
        "--trainer.strategy", strategy, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--model.update.max_grad_norm", str(MAX_NORM), "--trainer.default_root_dir", str(out / strategy),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", f"fsdp1_{strategy}",
    ]  # fmt: skip
    return command + (["--print_config"] if dry_run else [])


def grad_norms(run: Path) -> list[float]:
    """The logged gradient norm of each step, from the run's metrics.csv (empty when none)."""
    files = sorted(run.rglob("metrics.csv"))
    if not files:
        return []
    with files[0].open(newline="") as f:
        rows = list(csv.DictReader(f))
    column = next((c for c in (rows[0] if rows else {}) if c.endswith("grad_norm")), None)
    return [float(r[column]) for r in rows if column and r.get(column) not in (None, "")]


def trainer(steps: int, out: Path, dry_run: bool) -> dict:
    result = {"check": "trainer"}
    for strategy in ("fsdp", "auto"):
        proc = subprocess.run(fit_command(strategy, steps, out, dry_run), cwd=REPO, capture_output=True, text=True)
        (out / f"fit_{strategy}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            return dict(result, status=f"failed: fit with strategy {strategy} exited {proc.returncode}: {tail}")
        result[f"grad_norms_{strategy}"] = [] if dry_run else grad_norms(out / f"fsdp1_{strategy}")
    if dry_run:
        return dict(result, status="dry run: both fit configs parse (--print_config); Lightning runs FSDP on GPUs")
    fsdp, auto = result["grad_norms_fsdp"], result["grad_norms_auto"]
    if not fsdp or len(fsdp) != len(auto):
        return dict(result, status=f"failed: {len(fsdp)} logged norms under fsdp, {len(auto)} under auto")
    result["rel_diff_first_step"] = abs(fsdp[0] - auto[0]) / max(abs(auto[0]), 1e-30)
    return dict(result, status="ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="RL steps of each fit")
    parser.add_argument("--out", type=Path, default=None, help="logs and runs (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: what runs without an accelerator (see above)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("check_fsdp1_clip: no CUDA device (FSDP1 needs an accelerator); on a CPU run --dry-run")
    out = args.out or Path(tempfile.mkdtemp(prefix="fsdp1_"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    results = [direct(device, args.dry_run), trainer(args.steps, out, args.dry_run)]
    for r in results:
        print(json.dumps(r), flush=True)
    (out / "check_fsdp1_clip.json").write_text(json.dumps(results, indent=1))
    failed = [r["check"] for r in results if r["status"].startswith("failed")]
    print(json.dumps({"bench": "check_fsdp1_clip", "failed": failed, "out": str(out), "dry_run": args.dry_run}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
