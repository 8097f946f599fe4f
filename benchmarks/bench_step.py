"""One GRPO training step on the embedded world, split into its phases: rollout, log-prob, loss + backward.

Runs the real trainer (``P2OModule`` + ``PromptDataModule``, the toy config's settings) for a few RL steps and
reads the module's own phase timers (``time/rollout_s``: sampling K responses per prompt with HF ``generate`` and
grading them; ``time/logprob_s``: old log-probs and entropy of every rollout, no grad; ``time/update_s``: PPO
forward + loss + backward + optimizer step). The first step is a warm-up and is dropped.

    python benchmarks/bench_step.py [--steps 6] [--batch-size 16] [--num-rollouts 8]

Prints a table, writes ``benchmarks/results/step_<device>.csv`` and ``.png``, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
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
    args = parser.parse_args()

    L.seed_everything(0)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    module = P2OModule(
        model=args.model,
        num_rollouts=args.num_rollouts,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
        micro_batch_size=64,
    )
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


if __name__ == "__main__":
    main()
