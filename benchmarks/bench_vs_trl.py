"""Side by side with TRL: GRPO steps of ours (``P2OModule``) and of TRL's ``GRPOTrainer``, the same work, on CPU.

What is held equal. The same local model and 0/1 reward (the addition task's grader); the same prompts in the same
order: :func:`step_prompts` (seeded permutations of the world's training prompts) gives each step's prompts, ours
read them from a plain loader in that order, TRL from a dataset in that order with ``shuffle_dataset=False``, and
every step records a digest of its prompts, compared between the sides at the end. K rollouts per prompt, max new
tokens, one EOS rule (responses end at the tokenizer's EOS token only: :func:`vs_trl.eos_rule`, checked on both
trainers), temperature 1, top-p 1, AdamW (lr, no weight decay, constant schedule), gradient clipping at 1, no KL
(β = 0: neither loads a reference model), one update per step on the whole batch in micro-batches of
``--micro-batch`` rows (ours: ``micro_batch_size``; TRL: ``per_device_train_batch_size`` with
``gradient_accumulation_steps = steps_per_generation`` = rows / micro-batch, so no separate π_old pass on either
side), the same torch thread count. Precision, both sides set explicitly (``--precision``): ``fp32`` (ours
``32-true``; TRL ``bf16=False, fp16=False``) or ``bf16`` (bf16 autocast over float32 weights and AdamW states:
ours ``bf16-mixed``; TRL ``bf16=True, fp16=False``); TRL's weights load as float32 (``model_init_kwargs``), its
gradient checkpointing is off (ours never checkpoints here), its LM head keeps its default
``cast_lm_head_to_fp32=False``, while our log-prob op computes the head in float32 under autocast too.

What differs by design: ours packs each micro-batch's sequences end to end (``p2o_lightning/packing.py``), TRL runs
every micro-batch at the generation batch's padded width (both reported: ``update positions`` against the real ones);
the samplers draw different random numbers, so responses (and their lengths: ``response tokens``, and how many ended
at EOS) differ. Our side runs as two variants, interleaved with TRL's: ``ours`` (every default: the step's passes
decide the fused head, :meth:`PPOUpdate.wants_fused_head`) and ``ours-other-head`` (the fused head the other way),
so that every setting has a row with the fused head on and one with it off.

Measured, per run (a fresh subprocess; TRL in its own venv with ``--trl-python``, see scripts/make_trl_venv.sh):
``--steps`` optimizer steps, the first ``--warmup`` not counted; each step's wall time (from the trainer's
step-begin to its step-end callback) split into phases by timing wrappers, each second counted once, in its
innermost phase: ``generate`` (ours ``engine.generate``; TRL ``_generate``: tokenize, generate, decode), ``grade``
(ours ``grader.grade``; TRL ``_calculate_rewards``), ``forward`` (the update's forward and loss: ours the PPO
update's own time less its backward and optimizer; TRL ``compute_loss``), ``backward`` (ours ``manual_backward``;
TRL ``accelerator.backward``), ``optimizer`` (gradient clipping and ``AdamW.step``), and ``rest`` (the step less all
of them: padding, advantages, metrics). Logging is outside both step times: TRL logs after its step-end callback,
ours inside ``training_step`` (``log_step``: ``self.log`` of every metric), which is measured as ``log`` and taken
out of our step's time. Memory: RSS after set-up (model and optimizer built, weights read so that
their mapped pages are resident, before the first step), plus the AdamW state that the first step creates (measured
at the end as the bytes of the optimizer's state tensors): that sum is the baseline; the peak RSS during the counted
steps (``VmHWM`` reset at the first counted step, :class:`common.PeakRSS`) less the baseline is ``peak above``: the
memory a step needs above weights and optimizer (gradients, activations, rollouts, the allocator's slack). Runs are
interleaved (ours, TRL, ours, TRL, …) so drifting machine load hits both alike; the load average is recorded at the
start and end of each run.

Settings: ``embedded`` (the default run's world, a 0.37 M-parameter Qwen3) and ``qwen3-151k``: a Qwen3 with
Qwen's 151,936-token vocabulary (2 layers, width 256, tied embeddings, ~40 M parameters, random weights —
timing only; the world's tokenizer, so most sampled ids decode to nothing and responses run to the length limit).

    python benchmarks/bench_vs_trl.py --trl-python .venv-trl/bin/python                        # embedded, fp32
    python benchmarks/bench_vs_trl.py --trl-python .venv-trl/bin/python --setting qwen3-151k   # ~2 h on one core

Both default to fp32, 12 steps of which the first 2 are warm-up (10 counted) × 3 interleaved rounds of
``ours``, ``ours-other-head`` and ``trl`` (``--variants``).

Appends a row per run to ``benchmarks/results/bench_vs_trl/bench_vs_trl_<device kind>.csv``, prints a markdown
table and writes it to ``benchmarks/results/bench_vs_trl/<setting>_<precision>_<device kind>.md``, with every step
of every run next to it (``…_steps.json``); the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import PeakRSS, TimedCall, environment, qwen3_151k_path, rss_mb, write_csv  # noqa: E402
from vs_trl import LOGGING, PHASES, PhaseClock, eos_rule, prompts_digest, step_prompts, summarize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_vs_trl"
PRECISION = {"fp32": {"ours": "32-true", "trl_bf16": False}, "bf16": {"ours": "bf16-mixed", "trl_bf16": True}}
PACKAGES = ("torch", "transformers", "lightning", "trl", "accelerate")
VARIANTS = ("ours", "ours-other-head", "trl")  # ours: every default; ours-other-head: the fused head the other way


class StepLog:
    """What each optimizer step of a run records (time, phases, prompts, widths), and the run's memory; both sides
    feed it from their trainer's callbacks and wrappers."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.clock = PhaseClock()
        self.steps: list[dict] = []
        self.memory = PeakRSS()
        self.rss_setup_mb = self.rss_warm_mb = self.peak_mb = 0.0
        self._row: dict = {}

    def set_up(self, params) -> None:
        """The RSS of the set-up, weights resident: ``from_pretrained`` maps a float32 checkpoint's file and the
        pages count in RSS only once read (by the first step, otherwise), so they are read here first."""
        with torch.no_grad():
            for p in params:
                p.sum()
        self.rss_setup_mb = rss_mb()

    def begin(self) -> None:
        if len(self.steps) == self.warmup:
            self.rss_warm_mb = rss_mb()
            self.memory.reset()
        self.clock.take()
        self._row = {"begin": time.perf_counter(), "prompts": None, "update_positions": 0, "update_real": 0}

    def prompts(self, prompts: list[str]) -> None:
        if self._row["prompts"] is None:
            self._row.update(prompts=prompts_digest(prompts), first_prompt=prompts[0])

    def generated(
        self, rows: int, prompt_width: int, response_width: int, prompt_tokens: int, response_tokens: int, eos: int
    ) -> None:
        self._row.update(gen_rows=rows, gen_prompt_width=prompt_width, gen_response_width=response_width)
        self._row.update(prompt_tokens=prompt_tokens, response_tokens=response_tokens, eos_rows=eos)

    def fused_head(self, on: bool) -> None:
        self._row["fused_head"] = on

    def update_forward(self, positions: int, real: int) -> None:
        self._row["update_positions"] += positions
        self._row["update_real"] += real

    def end(self) -> None:
        row = self._row
        row["step_s"] = time.perf_counter() - row.pop("begin")
        row.update(self.clock.take())
        row["step_s"] -= row[LOGGING]  # logging is outside the step's time on both sides
        row["rest"] = row["step_s"] - sum(row[p] for p in PHASES)
        self.steps.append(row)
        if len(self.steps) > self.warmup:
            self.peak_mb = self.memory.peak()

    def result(self, params, optimizer) -> dict:
        unique = {p.data_ptr(): p for p in params}.values()  # tied embeddings once
        state = [t for s in optimizer.state.values() for t in s.values() if hasattr(t, "nbytes")]
        versions = {}
        for name in PACKAGES:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = "-"
        return {
            "steps": self.steps,
            "weights_mb": sum(p.numel() * p.element_size() for p in unique) / 2**20,
            "adam_state_mb": sum(t.nbytes for t in state) / 2**20,
            "rss_setup_mb": self.rss_setup_mb,
            "rss_warm_mb": self.rss_warm_mb,
            "peak_mb": self.peak_mb,
            "peak_how": self.memory.how,
            "versions": versions,
        }


def model_path(setting: str) -> str:
    from p2o_lightning.tasks.shipped_world import shipped_world

    return str(shipped_world() if setting == "embedded" else qwen3_151k_path())


def step_rows(args: argparse.Namespace) -> list[dict]:
    """The run's problems in training order (``prompts`` per step), the same list on both sides."""
    from p2o_lightning.data import problem_rows
    from p2o_lightning.tasks.addition import world_splits

    rows = problem_rows(world_splits(0)["train"], "train")
    return [rows[i] for step in step_prompts(len(rows), args.prompts, args.steps, args.order_seed) for i in step]


def eos_ids(path: str) -> list[int]:
    """The EOS rule of both sides for the model at ``path`` (:func:`vs_trl.eos_rule`): its tokenizer's EOS id."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        named = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the model's config says it
        from transformers import AutoConfig

        named = AutoConfig.from_pretrained(path).eos_token_id
    return eos_rule(named, AutoTokenizer.from_pretrained(path).eos_token_id)


def run_ours(args: argparse.Namespace, path: str, log: StepLog) -> dict:
    import dataclasses

    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    import p2o_lightning.module as module_mod
    from p2o_lightning.loss import LossSettings
    from p2o_lightning.module import P2OModule
    from p2o_lightning.settings import ComputeSettings, RolloutSettings, UpdateSettings, ValidationSettings

    clock = log.clock
    torch.optim.AdamW.step = clock.wrap(torch.optim.AdamW.step, "optimizer")
    module_mod.log_step = clock.wrap(module_mod.log_step, LOGGING)  # self.log of the step's metrics
    eos = eos_ids(path)

    class Recorder(Callback):
        def on_train_start(self, trainer, m) -> None:
            if sorted(m.engine.eos_token_ids) != eos:
                raise SystemExit(f"our engine stops on EOS ids {m.engine.eos_token_ids}, the rule is {eos}")
            if args._run == "ours-other-head":  # the fused head the other way from the default's choice
                vocab = m.policy.lm.get_output_embeddings().weight.shape[0]
                other = not m.ppo.wants_fused_head(vocab)
                m.ppo.logprob = dataclasses.replace(m.ppo.logprob, fused_head=other)
            passes = m.ppo.passes

            def recorded(*a, **k):
                out = passes(*a, **k)
                log.fused_head(out.fused_head)
                return out

            m.ppo.passes = recorded
            generate = clock.wrap(m.engine.generate, "generate")
            eos_t = torch.tensor(eos)

            def generated(prompts, sampling):
                out = generate(prompts, sampling)
                ended = (torch.isin(out.response_ids, eos_t) & out.response_mask.bool()).any(1)  # [M]
                log.generated(out.response_ids.shape[0], out.prompt_ids.shape[1], out.response_ids.shape[1],
                              int(out.prompt_mask.sum()), int(out.response_mask.sum()), int(ended.sum()))  # fmt: skip
                return out

            m.engine.generate = generated
            m.grader.grade = clock.wrap(m.grader.grade, "grade")
            m.ppo = TimedCall(m.ppo, clock.wrap(m.ppo, "forward"))
            m.manual_backward = clock.wrap(m.manual_backward, "backward")
            m._optimizer_step.clip = clock.wrap(m._optimizer_step.clip, "optimizer")

            def count_real(module, inputs, kwargs) -> None:
                if torch.is_grad_enabled():  # the update's forwards (a separate π_old pass runs without grad)
                    log.update_forward(0, int(inputs[1].sum()))

            def count_positions(module, inputs, kwargs) -> None:  # the decoder's: packed rows, as they ran
                if torch.is_grad_enabled():
                    log.update_forward(kwargs["input_ids"].numel(), 0)

            m.policy.register_forward_pre_hook(count_real, with_kwargs=True)
            m.policy.lm.get_decoder().register_forward_pre_hook(count_positions, with_kwargs=True)
            log.set_up(m.policy.parameters())

        def on_train_batch_start(self, trainer, m, batch, batch_idx) -> None:
            log.begin()
            log.prompts([row["prompt"] for row in batch])

        def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx) -> None:
            log.end()

    L.seed_everything(args.seed)
    module = P2OModule(
        model=path, optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0),
        rollout=RolloutSettings(args.k, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
        update=UpdateSettings(ppo_epochs=1, micro_batch_size=args.micro_batch, max_grad_norm=1.0),
        loss=LossSettings(kl_coef=0.0), compute=ComputeSettings(dtype="float32", gradient_checkpointing=False),
        validation=ValidationSettings(num_samples=0),
    )  # fmt: skip
    loader = DataLoader(step_rows(args), batch_size=args.prompts, shuffle=False, collate_fn=list)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=args.steps, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            precision=PRECISION[args.precision]["ours"], callbacks=[Recorder()], default_root_dir=tmp,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=loader)
    return log.result(module.policy.parameters(), trainer.optimizers[0])


def run_trl(args: argparse.Namespace, path: str, log: StepLog) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from p2o_lightning.tasks.addition import AdditionTask

    clock = log.clock
    torch.optim.AdamW.step = clock.wrap(torch.optim.AdamW.step, "optimizer")
    task = AdditionTask()
    rows = step_rows(args)
    data = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})

    def reward(completions, answer, **kwargs) -> list[float]:
        return [task.score(c, a).reward for c, a in zip(completions, answer)]

    eos = eos_ids(path)

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **k) -> None:
            log.set_up(model.parameters())

        def on_step_begin(self, *a, **k) -> None:
            log.begin()

        def on_step_end(self, *a, **k) -> None:
            log.end()

    accumulation = args.prompts * args.k // args.micro_batch
    bf16 = PRECISION[args.precision]["trl_bf16"]
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accumulation,
            steps_per_generation=accumulation, num_generations=args.k, max_completion_length=args.max_new_tokens,
            temperature=1.0, top_p=1.0, learning_rate=args.lr, weight_decay=0.0, optim="adamw_torch",
            max_grad_norm=1.0, beta=0.0, num_iterations=1, max_steps=args.steps, shuffle_dataset=False,
            bf16=bf16, fp16=False, gradient_checkpointing=False, cast_lm_head_to_fp32=False,
            model_init_kwargs={"dtype": "float32"}, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
            seed=args.seed, lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        tok = AutoTokenizer.from_pretrained(path)
        trainer = GRPOTrainer(
            model=path, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok,
            callbacks=[Recorder()],
        )  # fmt: skip
        stops = trainer.generation_config.eos_token_id
        if [tok.eos_token_id] != eos or sorted([stops] if isinstance(stops, int) else stops) != eos:
            raise SystemExit(f"TRL stops on EOS ids {stops} and masks after {tok.eos_token_id}, the rule is {eos}")
        generate = clock.wrap(trainer._generate, "generate")

        def generated(prompts):
            groups = prompts[:: args.k]  # each prompt comes K times in a row (TRL's RepeatSampler)
            if [p for p in groups for _ in range(args.k)] != prompts:
                raise RuntimeError("TRL's generation batch is not K consecutive copies of each prompt")
            log.prompts(groups)
            out = generate(prompts)
            prompt_ids, completion_ids = out[0], out[1]
            log.generated(len(completion_ids), max(map(len, prompt_ids)), max(map(len, completion_ids)),
                          sum(map(len, prompt_ids)), sum(map(len, completion_ids)),
                          sum(eos[0] in c for c in completion_ids))  # fmt: skip
            return out

        compute_loss = clock.wrap(trainer.compute_loss, "forward")

        def counted_loss(model, inputs, *a, **k):
            ids = inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()
            log.update_forward(ids, int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()))
            return compute_loss(model, inputs, *a, **k)

        trainer._generate = generated
        trainer._calculate_rewards = clock.wrap(trainer._calculate_rewards, "grade")
        trainer.compute_loss = counted_loss
        trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "backward")
        trainer._clip_grad_norm = clock.wrap(trainer._clip_grad_norm, "optimizer")
        trainer.train()
    return log.result(trainer.model.parameters(), trainer.optimizer.optimizer)


def markdown(rows: list[dict], head: str) -> str:
    """The table: one column per variant (ours, ours-other-head, TRL)."""
    names = {"ours": "ours (defaults)", "ours-other-head": "ours, other head", "trl": "TRL"}
    trl = next(r for r in rows if r["impl"] == "trl")
    lines = [head, "", "| | " + " | ".join(names.get(r["impl"], r["impl"]) for r in rows) + " |"]
    lines.append("|---" * (len(rows) + 1) + "|")

    def line(name, fmt):
        lines.append(f"| {name} | " + " | ".join(fmt(r) for r in rows) + " |")

    line("fused head", lambda r: {"True": "on", "False": "off"}.get(r["fused_head"], r["fused_head"]))
    line("s/step, min / median", lambda r: f"{r['min_s']:.3f} / **{r['median_s']:.3f}**")
    line("run medians (s)", lambda r: r["run_medians_s"])
    line("TRL / this (median)", lambda r: f"**{trl['median_s'] / r['median_s']:.2f}×**" if r is not trl else "")
    for p in (*PHASES, "rest"):
        line(f"{p} (s, median)", lambda r, p=p: f"{r[p + '_s']:.3f} ({r[p + '_s'] / r['median_s']:.0%})")
    line("logging, outside the step (s, median)", lambda r: f"{r[LOGGING + '_s']:.3f}")
    line("generation batch: rows × (prompt + response width)",
         lambda r: f"{r['gen_rows']:.0f} × ({r['gen_prompt_width']:.0f} + {r['gen_response_width']:.0f})")  # fmt: skip
    line("tokens generated / step (real)", lambda r: f"{r['response_tokens']:.0f}")
    line("responses that ended at EOS / step", lambda r: f"{r['eos_rows']:.0f} of {r['gen_rows']:.0f}")
    line("update forward positions / step: padded (real)",
         lambda r: f"{r['update_positions']:.0f} ({r['update_real']:.0f})")  # fmt: skip
    line("weights + AdamW state (MB)", lambda r: f"{r['weights_mb']:.0f} + {r['adam_state_mb']:.0f}")
    line("RSS after set-up / after warm-up (MB)", lambda r: f"{r['rss_setup_mb']:.0f} / {r['rss_warm_mb']:.0f}")
    line("peak RSS above set-up + AdamW state (MB)", lambda r: f"**{r['peak_above_mb']:.0f}**")
    line("… of TRL's", lambda r: f"{r['peak_above_mb'] / trl['peak_above_mb']:.0%}" if r is not trl else "")
    line("load average at run start / end", lambda r: f"{r['load_start']} / {r['load_end']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("embedded", "qwen3-151k"), default="embedded")
    parser.add_argument("--precision", choices=tuple(PRECISION), default="fp32", help="of both sides (see above)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run not counted")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of runs (one run per variant)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}; trl needed")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--k", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--micro-batch", type=int, default=32, help="rows per forward / backward, both sides")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0, help="seed of both trainers")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the prompt order (step_prompts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--trl-python", default=sys.executable, help="the python of a venv with trl installed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--_run", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = args.variants.split(",")
    if "trl" not in variants or not set(variants) <= set(VARIANTS) or len(set(variants)) < 2:
        parser.error(f"--variants {args.variants}: name trl and one or more of ours, ours-other-head")
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no counted step after --warmup {args.warmup}")
    if args.prompts * args.k % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} does not divide the {args.prompts * args.k} rows of a step")

    torch.set_num_threads(args.threads)
    if args._run:
        load = os.getloadavg()[0]
        log = StepLog(args.warmup)
        result = (run_trl if args._run == "trl" else run_ours)(args, model_path(args.setting), log)
        result["load"] = [load, os.getloadavg()[0]]
        print(json.dumps(result))
        return

    model_path(args.setting)  # build it once, outside the timed runs
    env = environment(torch.device("cpu"))
    load_start = os.getloadavg()
    keys = ("setting", "precision", "steps", "warmup", "prompts", "k", "micro_batch", "max_new_tokens", "lr", "seed",
            "order_seed", "threads")  # fmt: skip
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for impl in variants:
            python = args.trl_python if impl == "trl" else sys.executable
            envv = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run([python, __file__, *passed, f"--_run={impl}"], capture_output=True, text=True,
                                  env=envv)  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"{impl} run {round_} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[impl].append(result)
            kept = [s["step_s"] for s in result["steps"][args.warmup :]]
            print(f"round {round_} {impl:>15}: min {min(kept):.3f}, median {statistics.median(kept):.3f} s/step over "
                  f"{len(kept)} steps; peak {result['peak_mb']:.0f} MB (set-up {result['rss_setup_mb']:.0f} MB); "
                  f"load {result['load'][0]:.2f} → {result['load'][1]:.2f}", flush=True)  # fmt: skip

    digests = {impl: [[s["prompts"] for s in r["steps"]] for r in rs] for impl, rs in runs.items()}
    same_prompts = all(d == digests["trl"][0] for rs in digests.values() for d in rs)
    first = runs["trl"][0]["steps"]
    print("prompts of each step, digest (first prompt): "
          + ", ".join(f"{s['prompts']} ({s['first_prompt']})" for s in first[:3]) + ", ...;"
          + (" the same on both sides in every run" if same_prompts else " NOT THE SAME on both sides"))  # fmt: skip
    if not same_prompts:
        raise SystemExit(f"the sides trained on different prompts: {json.dumps(digests)}")

    load_end = os.getloadavg()
    ours = next(v for v in variants if v != "trl")
    versions = {"ours": runs[ours][0]["versions"], "trl": runs["trl"][0]["versions"]}
    rows = [summarize(impl, rs, args.warmup) for impl, rs in runs.items()]
    trl = rows[variants.index("trl")]
    head = (
        f"**{args.setting}, {args.precision}**: {args.prompts} prompts × K={args.k}, {args.max_new_tokens} new "
        f"tokens, micro-batch {args.micro_batch}, {args.steps - args.warmup} counted steps after {args.warmup} "
        f"warm-up × {args.rounds} interleaved rounds; {env['device']}; commit {env['commit']}, {env['date']}; "
        + "; ".join(f"{k}: " + ", ".join(f"{p} {v}" for p, v in vs.items() if v != "-") for k, vs in versions.items())
        + f"; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; peak RSS by "
        f"{runs['trl'][0]['peak_how']}; the same prompts in the same order on both sides (digests checked); one EOS "
        f"rule on both sides (the tokenizer's EOS id {eos_ids(model_path(args.setting))}, checked on each trainer); "
        "logging outside every step's time."
    )
    table = markdown(rows, head)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.setting}_{args.precision}_{env['device_kind']}"
    (args.out / f"{stem}.md").write_text(table)
    raw = {"env": env, "args": {k: getattr(args, k) for k in keys}, "runs": runs}  # every step of every run
    (args.out / f"{stem}_steps.json").write_text(json.dumps(raw, indent=1) + "\n")
    common = {**env, **{k: getattr(args, k) for k in keys}, "same_prompts": same_prompts,
              "load_avg_start": load_start[0], "load_avg_end": load_end[0],
              **{f"trl_env_{k}": v for k, v in versions["trl"].items()}}  # fmt: skip
    out_rows = [dict(common, **row) for row in rows]
    csv_path = args.out / f"bench_vs_trl_{env['device_kind']}.csv"
    write_csv(out_rows, csv_path, list(out_rows[0]))
    summary = {
        "bench": "vs_trl",
        **env,
        "setting": args.setting,
        "precision": args.precision,
        "trl_s": round(trl["median_s"], 4),
        "trl_peak_above_mb": round(trl["peak_above_mb"]),
        "csv": str(csv_path),
    }
    for row in rows:
        if row is not trl:
            summary[row["impl"]] = {
                "s": round(row["median_s"], 4),
                "fused_head": row["fused_head"],
                "trl_over_this": round(trl["median_s"] / row["median_s"], 3),
                "peak_above_mb": round(row["peak_above_mb"]),
                "peak_above_of_trl": round(row["peak_above_mb"] / trl["peak_above_mb"], 3),
            }
    print(json.dumps(summary))  # fmt: skip


if __name__ == "__main__":
    main()
