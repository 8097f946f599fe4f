"""Side by side with TRL: one GRPO step of ours (``P2OModule``) vs TRL's ``GRPOTrainer``, same model, same work, CPU.

Both trainers get the same local model, the embedded world's training prompts and 0/1 reward (the addition task's
grader), K rollouts per prompt, the same prompts per step, max new tokens, temperature 1, learning rate, no KL
(β = 0, so neither loads a reference model), one PPO update per step on the whole batch (TRL:
``num_iterations=1``, ``steps_per_generation=1``), and the same torch thread count. Each run is a fresh subprocess
(TRL in its own venv when given ``--trl-python``; TRL 1.16 also installs next to this package with the repo's
pins), runs ``--steps`` optimizer steps and reports the wall time of each (the first ``--warmup`` dropped) and its
peak RSS; runs are interleaved (ours, TRL, ours, TRL, …) so drifting machine load hits both alike.

Settings: ``embedded`` (the default run's world, a 0.37 M-parameter Qwen3) and ``qwen3-151k``: a Qwen3 with
Qwen's 151,936-token vocabulary (2 layers, width 256, tied embeddings, ~40 M parameters, random weights —
timing only; the world's tokenizer, so most sampled ids decode to nothing and responses run to the length limit).

    python benchmarks/bench_vs_trl.py --setting embedded --trl-python .venv-trl/bin/python
    python benchmarks/bench_vs_trl.py --setting qwen3-151k --steps 4 --warmup 1 --rounds 1

Writes (appends) ``benchmarks/results/bench_vs_trl_<device kind>.csv``; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QWEN_VOCAB = 151936


def qwen3_151k_path() -> Path:
    """Build (once, seeded) the random 151,936-vocabulary Qwen3 with the embedded world's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from p2o_lightning.tasks.shipped_world import shipped_world
    from p2o_lightning.tasks.world import default_cache_dir

    path = default_cache_dir() / "bench_vs_trl" / "qwen3-151k-v1"
    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(shipped_world())
    config = Qwen3Config(
        vocab_size=QWEN_VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def model_path(setting: str) -> str:
    from p2o_lightning.tasks.shipped_world import shipped_world

    return str(shipped_world() if setting == "embedded" else qwen3_151k_path())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args: argparse.Namespace, path: str) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from p2o_lightning.data import PromptDataModule
    from p2o_lightning.module import P2OModule

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *a) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *a) -> None:
            self.times.append(time.perf_counter() - self.start)

    L.seed_everything(0)
    module = P2OModule(
        model=path, num_rollouts=args.k, max_new_tokens=args.max_new_tokens, temperature=1.0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr), kl_coef=0.0, ppo_epochs=1, val_num_samples=0,
    )  # fmt: skip
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=args.steps, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, callbacks=[timer], default_root_dir=tmp,
        )  # fmt: skip
        trainer.fit(module, datamodule=PromptDataModule(batch_size=args.prompts))
    return {"step_s": timer.times, "peak_rss_mb": peak_rss_mb()}


def run_trl(args: argparse.Namespace, path: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from p2o_lightning.tasks.addition import AdditionTask, world_splits

    task = AdditionTask()
    train = world_splits(0)["train"]
    data = Dataset.from_dict({"prompt": [p.prompt for p in train], "answer": [p.answer for p in train]})

    def reward(completions, answer, **kwargs) -> list[float]:
        return [task.score(c, a).reward for c, a in zip(completions, answer)]

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *a, **k) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.prompts * args.k, num_generations=args.k,
            max_completion_length=args.max_new_tokens, temperature=1.0, learning_rate=args.lr, beta=0.0,
            num_iterations=1, steps_per_generation=1, max_steps=args.steps, use_cpu=True, report_to=[],
            save_strategy="no", logging_steps=1, seed=0, lr_scheduler_type="constant", warmup_steps=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        timer = StepTimes()
        tok = AutoTokenizer.from_pretrained(path)
        trainer = GRPOTrainer(
            model=path, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok, callbacks=[timer]
        )
        trainer.train()
    return {"step_s": timer.times, "peak_rss_mb": peak_rss_mb()}


def versions(python: str) -> dict:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d: m.version(d) for d in ('torch', 'trl', 'transformers')}))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("embedded", "qwen3-151k"), default="embedded")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run not counted")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved (ours, TRL) pairs of runs")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--k", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both")
    parser.add_argument("--trl-python", default=sys.executable, help="the python of a venv with trl installed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--_run", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._run:
        import torch

        torch.set_num_threads(args.threads)
        path = model_path(args.setting)
        result = (run_ours if args._run == "ours" else run_trl)(args, path)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from common import environment, write_csv

    model_path(args.setting)  # build it once, outside the timed runs
    env = environment(torch.device("cpu"))
    env["device"] = env["device"].rsplit(" (", 1)[0] + f" ({args.threads} threads)"
    trl_versions = versions(args.trl_python)
    common = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("setting", "steps", "prompts", "k", "lr",
                                                                       "threads", "max_new_tokens")]  # fmt: skip
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for round_ in range(args.rounds):
        for impl, python in (("ours", sys.executable), ("trl", args.trl_python)):
            envv = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run([python, __file__, *common, f"--_run={impl}"], capture_output=True, text=True,
                                  env=envv)  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"{impl} run {round_} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[impl].append(result)
            kept = result["step_s"][args.warmup :]
            print(f"round {round_} {impl:>4}: median {statistics.median(kept):.3f} s/step over {len(kept)} steps, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip

    rows = []
    for impl, results in runs.items():
        kept = [t for r in results for t in r["step_s"][args.warmup :]]
        rows.append(dict(env, **{f"trl_env_{k}": v for k, v in trl_versions.items()}, setting=args.setting, impl=impl,
                         prompts=args.prompts, k=args.k, max_new_tokens=args.max_new_tokens, lr=args.lr,
                         threads=args.threads, steps_counted=len(kept), median_s=statistics.median(kept),
                         min_s=min(kept), max_s=max(kept),
                         peak_rss_mb=max(r["peak_rss_mb"] for r in results)))  # fmt: skip
    ours, trl = rows
    speedup = trl["median_s"] / ours["median_s"]
    print(f"\n{args.setting}: ours {ours['median_s']:.3f} s/step, TRL {trl['median_s']:.3f} s/step "
          f"(TRL / ours = {speedup:.2f}×); peak RSS ours {ours['peak_rss_mb']:.0f} MB, "
          f"TRL {trl['peak_rss_mb']:.0f} MB")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_vs_trl_{env['device_kind']}.csv"
    columns = list(rows[0])
    write_csv(rows, path, columns)
    print(json.dumps({"bench": "vs_trl", **env, "setting": args.setting, "ours_s": round(ours["median_s"], 4),
                      "trl_s": round(trl["median_s"], 4), "speedup": round(speedup, 3),
                      "ours_peak_rss_mb": round(ours["peak_rss_mb"]), "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
                      "csv": str(path)}))  # fmt: skip


if __name__ == "__main__":
    main()
