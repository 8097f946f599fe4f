"""One GRPO training step on the embedded world, split into its phases: rollout, log-prob, loss + backward.

Runs the real trainer (``P2OModule`` + ``PromptDataModule``, the toy config's settings) for a few RL steps and
reads the module's own phase timers (``time/rollout_s``: sampling K responses per prompt with the rollout engine and
grading them; ``time/logprob_s``: old log-probs and entropy of every rollout, no grad; ``time/update_s``: PPO
forward + loss + backward + optimizer step). The first step is a warm-up and is dropped.

    python benchmarks/bench_step.py [--steps 6] [--batch-size 16] [--num-rollouts 8] [--engine loop|hf|vllm]
                                    [--model bpe] [--no-trim] [--micro-batch-tokens N]
    python benchmarks/bench_step.py --passes [--steps 6]
    python benchmarks/bench_step.py --compare-head [--model qwen3-151k] [--rounds 2]
    python benchmarks/bench_step.py --compare-engines [--steps 4]       # in .venv-vllm
    python benchmarks/bench_step.py --compare-processes [--steps 6]

Prints a table, writes ``benchmarks/results/step_<device>.csv`` and ``.png``, and ends with one JSON line.

``--compare-engines`` (in the venv of ``scripts/make_vllm_venv.sh``) runs our loop, HF ``generate`` and vLLM on the
embedded world and on a BPE + chat-template Qwen3 checkpoint (``--model bpe``: built in a temp folder, random weights,
the math task on our generated problems; its responses run to ``max_new_tokens``), each in a fresh process so its peak
RSS is its own, and writes ``step_engines_<device>.csv`` / ``.png``: tokens/s of each phase (response tokens of the
step over the phase's time) and peak memory. The vLLM rows include the weight sync after each update (in
``update``); engine start-up is outside the timed steps.

``--passes`` compares the log-prob passes of a step instead, each variant in a fresh process (peak RSS from
``getrusage``), on GRPO rows and on P²O rows (every prompt holds templates: distilled rows and the context ratio
mask): ``two-pass`` (log π(y|t(x)) and log π(y|x) in two passes, the separate π_old pass: the code before one-pass),
``one-pass`` (both contexts in one ``linear_logprob_multi`` call per micro-batch, still a separate π_old pass) and
``fused`` (the default: with one PPO epoch and one mini-batch, π_old, the entropy and the context come from the
update's own forward). Writes ``benchmarks/results/step_passes_<device>.csv``.

``--compare-head`` times the update with and without the fused head (``fused_head``: with one PPO update per step
the loss's LM-head gradients are computed in the log-prob pass, :mod:`p2o_lightning.fused_head`), ``--rounds``
interleaved fresh processes per variant, on ``--model embedded`` or ``qwen3-151k`` (Qwen's 151,936-token vocabulary,
random weights, built once by ``bench_vs_trl.py``). Writes ``benchmarks/results/step_head_<device>.csv``.

``--compare-processes`` runs the same global batch (``--batch-size`` prompts per step) on one process and on two
(gloo on CPU, NCCL on GPUs), with DDP and with FSDP2 (``ModelParallelStrategy``): each process gets
``batch-size / processes`` prompts and ``threads / processes`` CPU threads (``--threads``, default: every core). A
phase's time is the slowest rank's median, its tokens those of all ranks; peak memory is per process (the largest)
and summed. Writes ``benchmarks/results/step_processes_<device>.csv`` / ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TimedCall, environment  # noqa: E402

from p2o_lightning.data import PromptDataModule  # noqa: E402
from p2o_lightning.module import P2OModule  # noqa: E402
from p2o_lightning.settings import RolloutSettings, UpdateSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("generate", "grade", "logprob", "update")  # generate + grade = the module's time/rollout_s


class PhaseTimes(Callback):
    """The module's phase timers, with its rollout time split into the engine's ``generate`` and the grading, and
    the positions the policy's forwards ran on (``forward_positions``: rows × width of every log-prob and update
    forward of the step, the sampled prompt's context included; the padding they hold is compute too), and the
    process's CPU time in the log-prob and update stages (``logprob_cpu`` / ``update_cpu``: unlike wall time, not
    lengthened by other processes on the same cores).
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.generate_s = 0.0
        self.positions = 0
        self.cpu_s = {"logprob_cpu": 0.0, "update_cpu": 0.0}

    def on_train_start(self, trainer, pl_module) -> None:
        engine_generate = pl_module.engine.generate

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return engine_generate(*args, **kwargs)
            finally:
                self.generate_s += time.perf_counter() - t0

        pl_module.engine.generate = timed  # this instance only, for the benchmark

        def count(module, args, kwargs):
            context = kwargs.get("context_ids")
            self.positions += args[0].numel() + (0 if context is None else context.numel())

        pl_module.policy.register_forward_pre_hook(count, with_kwargs=True)
        import p2o_lightning.module as module_mod

        module_mod.rollout_logprobs = self.cpu_timed(module_mod.rollout_logprobs, "logprob_cpu")
        pl_module.ppo = TimedCall(pl_module.ppo, self.cpu_timed(pl_module.ppo, "update_cpu"))

    def cpu_timed(self, fn, key: str):
        """``fn`` with the process CPU seconds of each call added to ``self.cpu_s[key]``."""

        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu_s[key] += time.process_time() - t0

        return timed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        row = {p: float(m[f"time/{p}_s"]) for p in ("logprob", "update")}
        row["generate"], row["grade"] = self.generate_s, float(m["time/rollout_s"]) - self.generate_s
        self.generate_s = 0.0
        row["forward_positions"], self.positions = float(self.positions), 0
        row.update(self.cpu_s)
        self.cpu_s = dict.fromkeys(self.cpu_s, 0.0)
        row["response_tokens"] = float(m["train/response_length"]) * len(batch) * pl_module.rollout.num_rollouts
        self.rows.append(row)


def build_bpe_model(folder: Path) -> tuple[str, str]:
    """A BPE + chat-template Qwen3 checkpoint and a math JSONL of ours in ``folder``: (model path, train file)."""
    from p2o_lightning.tasks.bpe_checkpoint import build_bpe_checkpoint
    from p2o_lightning.tasks.math_data import math_problems, write_math_jsonl

    rows = math_problems(240)
    texts = [f"{r['prompt']} The answer is \\boxed{{{r['answer']}}}." for r in rows]
    model = build_bpe_checkpoint(folder / "qwen3-bpe", texts, hidden_size=128, num_layers=2, num_heads=4)
    return str(model), str(write_math_jsonl(folder / "math.jsonl", n=240))


def make_strategy(name: str):
    """``single`` (one process), ``ddp`` or ``fsdp2`` (``FSDP2Strategy``: the module shards itself over every rank)."""
    if name == "fsdp2":
        from p2o_lightning.sharded import FSDP2Strategy

        return FSDP2Strategy()
    return "ddp" if name == "ddp" else "auto"


def reduce_over_ranks(trainer, values: dict[str, float], op: str) -> dict[str, float]:
    """``values`` reduced over the ranks (``sum`` or ``max``); unchanged on one process."""
    if trainer.world_size == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=trainer.strategy.root_device)
    t = trainer.strategy.reduce(t, reduce_op=op)
    return dict(zip(values, t.tolist()))


def run_steps(args, tmp: Path) -> dict:
    """Fit ``args.steps`` RL steps; the medians of the module's phase timers (the slowest rank's), the response
    tokens of all ranks and the processes' peak RSS."""
    L.seed_everything(0)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    devices = getattr(args, "devices", 1)
    model, task, data = args.model, "addition", {}
    if args.model == "qwen3-151k":  # Qwen's vocabulary, random weights (bench_vs_trl.py builds it once)
        from common import qwen3_151k_path

        model = str(qwen3_151k_path())
    if args.model == "bpe":
        model, train = build_bpe_model(tmp)
        task, data = "math", {"train_file": train, "val_files": {"dev": train}}
    vllm_options = {"kv_cache_memory_bytes": 256 * 2**20} if args.engine == "vllm" else None
    module = P2OModule(
        model=model,
        task=task,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
        rollout=RolloutSettings(args.num_rollouts, max_new_tokens=args.max_new_tokens, engine=args.engine,
                                vllm_options=vllm_options),
        update=UpdateSettings(micro_batch_size=64),
    )  # fmt: skip
    fused = {"on": True, "off": False, "auto": None}[getattr(args, "fused_head", "auto")]  # auto: the step decides
    module.ppo.logprob = dataclasses.replace(module.ppo.logprob, fused_head=fused, head_dtype=args.head_dtype)
    if getattr(args, "variant", None):
        setup_variant(module, args.variant)
    if getattr(args, "no_trim", False):  # every forward at the batch's padded widths (the code before trimming)
        module.ppo.logprob = dataclasses.replace(module.ppo.logprob, trim=False)
    if getattr(args, "micro_batch_tokens", None):  # micro-batches by a token budget, rows sorted by length
        module.ppo.logprob = dataclasses.replace(module.ppo.logprob, micro_batch_tokens=args.micro_batch_tokens)
    timer = PhaseTimes()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=make_strategy(getattr(args, "strategy", "single")),
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
    per_rank = args.batch_size // devices
    trainer.fit(module, datamodule=PromptDataModule(task=task, batch_size=per_rank, **data))
    rows = timer.rows[1:] or timer.rows
    med = reduce_over_ranks(trainer, {p: statistics.median(r[p] for r in rows) * 1e3 for p in PHASES}, "max")
    tokens = reduce_over_ranks(trainer, {"t": statistics.median(r["response_tokens"] for r in rows)}, "sum")["t"]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    rss = {"max": reduce_over_ranks(trainer, {"r": rss_mb}, "max")["r"]}
    rss["sum"] = reduce_over_ranks(trainer, {"r": rss_mb}, "sum")["r"]
    env = environment(torch.device("cuda" if accelerator == "gpu" else "cpu"))
    record = {**env, "model": args.model, "engine": args.engine, "batch_size": args.batch_size}
    record.update(processes=trainer.world_size, strategy=getattr(args, "strategy", "single"))
    record["threads_per_process"] = torch.get_num_threads()
    record.update(num_rollouts=args.num_rollouts, max_new_tokens=args.max_new_tokens, steps=len(rows))
    record.update({f"{p}_ms": round(med[p], 2) for p in PHASES})
    record["total_ms"] = round(sum(med.values()), 2)
    record["response_tokens"] = round(tokens, 1)
    record["forward_positions"] = statistics.median(r["forward_positions"] for r in rows)
    record.update({f"{k}_ms": round(statistics.median(r[k] for r in rows) * 1e3, 2) for k in timer.cpu_s})
    record.update({f"{p}_tokens_per_s": round(tokens / med[p] * 1e3, 1) for p in PHASES})
    record["response_tokens_per_s"] = round(tokens / sum(med.values()) * 1e3, 1)
    record["peak_rss_mb"] = round(rss["max"], 1)
    record["peak_rss_all_mb"] = round(rss["sum"], 1)
    record["rank"] = trainer.global_rank
    return record


def append_csv(path: Path, record: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)


def phase_bars(records: list[dict], labels: list[str], xlabel: str, height: float):
    """A figure of two panels: each record's phases as stacked bars (left); the right one is the caller's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, height))
    left = [0.0] * len(records)
    for p in PHASES:
        axes[0].barh(labels, [r[f"{p}_ms"] for r in records], left=left, label=p)
        left = [a + r[f"{p}_ms"] for a, r in zip(left, records)]
    axes[0].set_xlabel(xlabel)
    axes[0].legend(fontsize=7, ncol=len(PHASES), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return fig, axes


def compare_engines(args) -> None:
    """One fresh process per (model, engine); a table, ``step_engines_<device>.csv`` and a plot."""
    records = []
    for model in ("embedded", "bpe"):
        for engine in ("loop", "hf", "vllm"):
            cmd = [sys.executable, __file__, "--model", model, "--engine", engine, "--json-only"]
            cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            cmd += ["--num-rollouts", str(args.num_rollouts), "--max-new-tokens", str(args.max_new_tokens)]
            env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{model} / {engine} failed:\n{out.stderr[-3000:]}")
            records.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = f"{'model':>9} {'engine':>6} " + " ".join(f"{p + ' tok/s':>15}" for p in PHASES)
    print(f"\nRL step, {args.batch_size} prompts x K={args.num_rollouts}, {records[0]['device']}")
    print(head + f" {'step tok/s':>11} {'peak RSS MB':>12}")
    for r in records:
        cells = " ".join(f"{r[p + '_tokens_per_s']:>15.0f}" for p in PHASES)
        print(f"{r['model']:>9} {r['engine']:>6} {cells} {r['response_tokens_per_s']:>11.0f} {r['peak_rss_mb']:>12.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"step_engines_{records[0]['device_kind']}"
    for r in records:
        append_csv(out.with_suffix(".csv"), r)

    labels = [f"{r['model']}\n{r['engine']}" for r in records]
    fig, axes = phase_bars(records, labels, "ms per RL step (median)", height=3)
    axes[1].barh(labels, [r["peak_rss_mb"] for r in records], color="gray")
    axes[1].set_xlabel("peak RSS of the process (MB)")
    fig.suptitle(
        f"HF generate vs vLLM, {args.batch_size}x{args.num_rollouts} rollouts, {records[0]['device']}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(json.dumps(records))


PROCESS_SETUPS = (("single", 1), ("ddp", 2), ("fsdp2", 2))


def compare_processes(args) -> None:
    """The same global batch on 1 process and on 2 (DDP, FSDP2), each setup in fresh processes."""
    threads = args.threads or os.cpu_count() or 1
    records = []
    for strategy, devices in PROCESS_SETUPS:
        cmd = [sys.executable, __file__, "--strategy", strategy, "--devices", str(devices), "--json-only"]
        cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--model", args.model]
        cmd += ["--num-rollouts", str(args.num_rollouts), "--max-new-tokens", str(args.max_new_tokens)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // devices))}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{strategy} x {devices} failed:\n{out.stderr[-3000:]}")
        lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
        records.append(next(r for r in lines if r["rank"] == 0))
    print(f"\nRL step, {args.batch_size} prompts x K={args.num_rollouts} in all, {records[0]['device']}")
    cols = " ".join(f"{p + ' ms':>11}" for p in PHASES)
    rss = f"{'RSS/proc MB':>11} {'RSS all MB':>10}"
    print(f"{'strategy':>9} {'procs':>5} {'threads':>7} {cols} {'step tok/s':>10} {rss}")
    for r in records:
        cells = " ".join(f"{r[p + '_ms']:>11.0f}" for p in PHASES)
        print(
            f"{r['strategy']:>9} {r['processes']:>5} {r['threads_per_process']:>7} {cells} "
            f"{r['response_tokens_per_s']:>10.0f} {r['peak_rss_mb']:>11.0f} {r['peak_rss_all_mb']:>10.0f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"step_processes_{records[0]['device_kind']}"
    for r in records:
        append_csv(out.with_suffix(".csv"), {k: v for k, v in r.items() if k != "rank"})
    out = out.with_name(f"{out.name}_{args.model}")  # the plot: one per model

    labels = [f"{r['strategy']} x{r['processes']}" for r in records]
    fig, axes = phase_bars(records, labels, "ms per RL step (median, slowest rank)", height=2.6)
    axes[1].barh(labels, [r["peak_rss_all_mb"] for r in records], color="lightgray", label="all processes")
    axes[1].barh(labels, [r["peak_rss_mb"] for r in records], color="gray", label="largest process")
    axes[1].set_xlabel("peak RSS (MB)")
    axes[1].legend(fontsize=7)
    what = f"{args.model} model, {args.batch_size}x{args.num_rollouts} rollouts in all"
    fig.suptitle(f"1 vs 2 processes, {what}, {records[0]['device'].split(' (')[0]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(json.dumps(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="RL steps to run (the first is dropped)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--num-rollouts", type=int, default=8, help="K")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    parser.add_argument(
        "--model", default="embedded", help="model path, 'embedded', 'bpe' (built here), 'qwen3-151k' (random weights)"
    )
    parser.add_argument("--engine", default="loop", choices=["loop", "hf", "vllm"], help="rollout engine")
    parser.add_argument("--compare-engines", action="store_true", help="HF vs vLLM on the embedded and BPE models")
    parser.add_argument("--passes", action="store_true", help="compare the log-prob pass variants (see above)")
    parser.add_argument("--compare-processes", action="store_true", help="1 vs 2 processes (DDP, FSDP2)")
    parser.add_argument("--threads", type=int, help="CPU threads in all for --compare-processes (default: every core)")
    parser.add_argument("--strategy", default="single", choices=["single", "ddp", "fsdp2"], help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-trim", action="store_true", help="forwards at the batch's padded widths, untrimmed")
    parser.add_argument("--micro-batch-tokens", type=int, help="micro-batches by this token budget (rows by length)")
    parser.add_argument("--fused-head", choices=("auto", "on", "off"), default="auto",
                        help="the fused head of a single update (fused_head; auto: by the vocabulary)")  # fmt: skip
    parser.add_argument("--head-dtype", choices=["bfloat16"], help="the fused head's matmul operands")
    parser.add_argument("--compare-head", action="store_true", help="unfused vs fused head, fresh processes (above)")
    parser.add_argument("--rounds", type=int, default=2, help="--compare-head: interleaved rounds per variant")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in its own process (--passes runs it)
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare_engines:
        return compare_engines(args)
    if args.passes:
        return compare_passes(args)
    if args.compare_processes:
        return compare_processes(args)
    if args.compare_head:
        return compare_head(args)
    if args.batch_size % args.devices:
        parser.error(f"--batch-size {args.batch_size} does not split over --devices {args.devices}")

    with tempfile.TemporaryDirectory() as tmp:
        record = run_steps(args, Path(tmp))
    if args.json_only:
        print(json.dumps(record), flush=True)
        return
    med = {p: record[f"{p}_ms"] for p in PHASES}
    total = record["total_ms"]
    what = f"{args.batch_size} prompts x K={args.num_rollouts}, {record['device']}"
    print(f"\nRL step on {args.model} ({args.engine}): {what}")
    print(f"{'phase':>10} {'ms (median)':>12} {'share':>7}")
    for p in PHASES:
        print(f"{p:>10} {med[p]:>12.1f} {med[p] / total:>7.1%}")
    print(f"{'total':>10} {total:>12.1f}   ({record['response_tokens_per_s']:.0f} response tokens/s)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"step_{record['device_kind']}"
    keys = ("date", "device", "device_kind", "torch", "commit", "batch_size", "num_rollouts", "steps")
    row = {k: record[k] for k in keys} | {f"{p}_ms": med[p] for p in PHASES}
    row.update(total_ms=total, response_tokens_per_s=record["response_tokens_per_s"])
    append_csv(out.with_suffix(".csv"), row)

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
    ax.set_title(f"GRPO step, {args.batch_size}x{args.num_rollouts} rollouts, {record['device']}", fontsize=8)
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

        k = module.rollout.num_rollouts
        module.template_assignments = {p.prompt: ["Out digits."] * k for p in world_splits()["train"]}
    if passes != "fused":
        module.ppo.fuses_old_logprobs = lambda batch: False
    if passes == "two-pass":  # the code before the one-pass change: the context is a pass of its own
        import p2o_lightning.module as module_mod
        from p2o_lightning.step import logprobs

        def two_pass(policy, reference, batch, ops, settings, need_old=True, with_context=False, stopwatch=None):
            out = logprobs.rollout_logprobs(policy, reference, batch, ops, settings, need_old, stopwatch=stopwatch)
            if with_context:
                sampled = batch.with_(prompt_ids=batch.sampled_prompt_ids, prompt_mask=batch.sampled_prompt_mask)
                with torch.no_grad():
                    out = out.with_(context_logp=logprobs.token_logprobs(policy, sampled, ops, settings)[0])
            return out

        module_mod.rollout_logprobs = two_pass


def run_fresh(args: argparse.Namespace, *extra: str) -> dict:
    """This script's record of one run in a fresh process (its own peak RSS), with ``extra`` arguments."""
    cmd = [sys.executable, __file__, "--steps", str(args.steps), "--json-only", "--model", args.model]
    cmd += ["--batch-size", str(args.batch_size), "--num-rollouts", str(args.num_rollouts), *extra]
    cmd += ["--max-new-tokens", str(args.max_new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def compare_head(args: argparse.Namespace) -> None:
    """The update with and without the fused head (one PPO update per step, the default), ``--rounds`` interleaved
    fresh processes each: update wall and CPU ms per step (medians over steps, then over rounds) and peak RSS.
    """
    variants = {"unfused": ("--fused-head=off",), "fused": ("--fused-head=on",)}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant, extra in variants.items():
            runs[variant].append(run_fresh(args, *extra))
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for variant, records in runs.items():
        row = {**env, "model": args.model, "batch_size": args.batch_size, "num_rollouts": args.num_rollouts}
        row.update(max_new_tokens=args.max_new_tokens, variant=variant, rounds=len(records))
        row["steps"] = sum(r["steps"] for r in records)
        for key in ("update_ms", "update_cpu_ms", "logprob_cpu_ms", "response_tokens"):
            row[key] = round(statistics.median(r[key] for r in records), 1)
        row["update_cpu_ms_all"] = " ".join(str(round(r["update_cpu_ms"])) for r in records)
        row["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in records), 1)
        rows.append(row)
    print(f"\nupdate, unfused vs fused head: {args.model}, {args.batch_size} prompts x K={args.num_rollouts}, "
          f"{env['device']} (median ms per step)")  # fmt: skip
    print(f"{'variant':>9} {'update wall':>12} {'update CPU':>11} {'per round':>18} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['variant']:>9} {r['update_ms']:>12.1f} {r['update_cpu_ms']:>11.1f} {r['update_cpu_ms_all']:>18} "
              f"{r['peak_rss_mb']:>12.0f}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in rows:
        append_csv(RESULTS / f"step_head_{env['device_kind']}.csv", r)
    print(json.dumps({r["variant"]: {k: r[k] for k in ("update_ms", "update_cpu_ms", "peak_rss_mb")} for r in rows}))


def compare_passes(args: argparse.Namespace) -> None:
    results = {}
    for variant in VARIANTS:
        record = run_fresh(args, "--variant", variant)
        results[variant] = {
            "steps": record["steps"],
            "rollout_ms": record["generate_ms"] + record["grade_ms"],
            "logprob_ms": record["logprob_ms"],
            "update_ms": record["update_ms"],
            "peak_rss_mb": record["peak_rss_mb"],
        }
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
