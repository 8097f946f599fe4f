"""One GRPO training step on the embedded world, split into its phases: rollout, log-prob, loss + backward.

Runs the real trainer (``P2OModule`` + ``PromptDataModule``, the toy config's settings) for a few RL steps and
reads the module's own phase timers (``time/rollout_s``: sampling K responses per prompt with HF ``generate`` and
grading them; ``time/logprob_s``: old log-probs and entropy of every rollout, no grad; ``time/update_s``: PPO
forward + loss + backward + optimizer step). The first step is a warm-up and is dropped.

    python benchmarks/bench_step.py [--steps 6] [--batch-size 16] [--num-rollouts 8]

Prints a table, writes ``benchmarks/results/step_<device>.csv`` and ``.png``, and ends with one JSON line.

``--passes`` compares the log-prob passes of a step instead, each variant in a fresh process (peak RSS from
``getrusage``), on GRPO rows and on P²O rows (every prompt holds templates: distilled rows and the context ratio
mask): ``two-pass`` (log π(y|t(x)) and log π(y|x) in two passes, the separate π_old pass: the code before one-pass),
``one-pass`` (both contexts in one ``linear_logprob_multi`` call per micro-batch, still a separate π_old pass) and
``fused`` (the default: with one PPO epoch and one mini-batch, π_old, the entropy and the context come from the
update's own forward). Writes ``benchmarks/results/step_passes_<device>.csv``.

    python benchmarks/bench_step.py --passes [--steps 6]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_logprob import environment  # noqa: E402

from p2o_lightning.data import PromptDataModule  # noqa: E402
from p2o_lightning.module import P2OModule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("rollout", "logprob", "update")


class PhaseTimes(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        row = {p: float(m[f"time/{p}_s"]) for p in PHASES}
        row["response_tokens"] = float(m["train/response_length"]) * len(batch) * pl_module.hparams.num_rollouts
        self.rows.append(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="RL steps to run (the first is dropped)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--num-rollouts", type=int, default=8, help="K")
    parser.add_argument("--model", default="embedded", help="model path, or 'embedded'")
    parser.add_argument("--passes", action="store_true", help="compare the log-prob pass variants (see above)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in its own process (--passes runs it)
    args = parser.parse_args()
    if args.passes:
        return compare_passes(args)

    L.seed_everything(0)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    module = P2OModule(
        model=args.model,
        num_rollouts=args.num_rollouts,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
        micro_batch_size=64,
    )
    if args.variant:
        setup_variant(module, args.variant)
    timer = PhaseTimes()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=args.steps,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[timer],
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=PromptDataModule(batch_size=args.batch_size))

    env = environment(torch.device("cuda" if accelerator == "gpu" else "cpu"))
    rows = timer.rows[1:] or timer.rows
    med = {p: statistics.median(r[p] for r in rows) * 1e3 for p in PHASES}
    if args.variant:  # a child of --passes: report and stop
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({**{f"{p}_ms": med[p] for p in PHASES}, "peak_rss_mb": peak, "steps": len(rows)}))
        return
    total = sum(med.values())
    tokens = statistics.median(r["response_tokens"] for r in rows)
    print(f"\nGRPO step on the embedded world: {args.batch_size} prompts x K={args.num_rollouts}, {env['device']}")
    print(f"{'phase':>10} {'ms (median)':>12} {'share':>7}")
    for p in PHASES:
        print(f"{p:>10} {med[p]:>12.1f} {med[p] / total:>7.1%}")
    print(f"{'total':>10} {total:>12.1f}   ({tokens / total * 1e3:.0f} response tokens/s)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"step_{env['device_kind']}"
    record = {**env, "batch_size": args.batch_size, "num_rollouts": args.num_rollouts, "steps": len(rows)}
    record.update({f"{p}_ms": round(med[p], 2) for p in PHASES})
    record["total_ms"] = round(total, 2)
    record["response_tokens_per_s"] = round(tokens / total * 1e3, 1)
    new = not out.with_suffix(".csv").exists()
    with open(out.with_suffix(".csv"), "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1.8))
    left = 0.0
    for p in PHASES:
        ax.barh([0], [med[p]], left=left, label=f"{p} {med[p]:.0f} ms")
        left += med[p]
    ax.set_yticks([])
    ax.set_xlabel("ms per RL step (median)")
    ax.set_title(f"GRPO step, {args.batch_size}x{args.num_rollouts} rollouts, {env['device']}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(json.dumps(record))


VARIANTS = ("grpo/old-pass", "grpo/fused", "p2o/two-pass", "p2o/one-pass", "p2o/fused")


def setup_variant(module: P2OModule, variant: str) -> None:
    """Put ``module`` in one of :data:`VARIANTS` (P²O: every training prompt holds templates)."""
    rows, passes = variant.split("/")
    if rows == "p2o":
        from p2o_lightning.tasks.addition import world_splits

        k = module.hparams.num_rollouts
        module.template_assignments = {p.prompt: ["Out digits."] * k for p in world_splits()["train"]}
    if passes != "fused":
        module.ppo.fuses_old_logprobs = lambda batch: False
    if passes == "two-pass":  # the code before the one-pass change: the context is a pass of its own
        import p2o_lightning.module as module_mod
        from p2o_lightning.step import logprobs

        def two_pass(policy, reference, batch, ops, settings, need_old=True, with_context=False):
            out = logprobs.rollout_logprobs(policy, reference, batch, ops, settings, need_old, with_context=False)
            if with_context:
                sampled = batch.with_(prompt_ids=batch.gen_ids, prompt_mask=batch.gen_mask)
                with torch.no_grad():
                    out = out.with_(context_logp=logprobs.token_logprobs(policy, sampled, ops, settings)[0])
            return out

        module_mod.rollout_logprobs = two_pass


def compare_passes(args: argparse.Namespace) -> None:
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)]
        cmd += ["--batch-size", str(args.batch_size), "--num-rollouts", str(args.num_rollouts), "--model", args.model]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"\nlog-prob passes, {args.batch_size} prompts x K={args.num_rollouts}, {env['device']} (median ms per step)")
    print(f"{'variant':>14} {'logprob':>9} {'update':>9} {'lp+update':>10} {'peak RSS MB':>12}")
    for variant, r in results.items():
        both = r["logprob_ms"] + r["update_ms"]
        print(f"{variant:>14} {r['logprob_ms']:>9.1f} {r['update_ms']:>9.1f} {both:>10.1f} {r['peak_rss_mb']:>12.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"step_passes_{env['device_kind']}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        fields = [*env, "batch_size", "num_rollouts", "variant", "steps", "rollout_ms", "logprob_ms", "update_ms"]
        writer = csv.DictWriter(f, fieldnames=[*fields, "peak_rss_mb"])
        if new:
            writer.writeheader()
        for variant, r in results.items():
            row = {**env, "batch_size": args.batch_size, "num_rollouts": args.num_rollouts, "variant": variant}
            writer.writerow({**row, **{k: round(v, 2) for k, v in r.items()}})
    print(json.dumps({v: {k: round(x, 1) for k, x in r.items()} for v, r in results.items()}))


if __name__ == "__main__":
    main()
