"""Rollout tokens/s of the ``loop`` engine against HF ``generate``, and what one decode step's sampling costs.

    python benchmarks/bench_rollout.py [--model qwen3-151k] [--prompts 8] [--k 8] [--new-tokens 32] [--rounds 3]

Both engines sample the same prompts (the embedded world's first training prompts, K rollouts each, temperature 1)
from the same weights, rounds interleaved (loop, hf, loop, hf, ...) after one warm-up round each; the table gives
each engine's median seconds per ``generate`` and response tokens per second (tokens up to and including each row's
EOS, as the trainer counts them). ``qwen3-151k`` is Qwen's 151,936-token vocabulary on a 2-layer random Qwen3
(``bench_vs_trl.py`` builds it once): its rows rarely stop early, so every row decodes ``--new-tokens`` tokens.

The second table times one decode step's sampling alone on [M, V] float32 logits: ``torch.multinomial`` over
``exp(log_softmax)`` (what the loop did before issue 26: V exponential draws a row) against
:func:`~p2o_lightning.rollout.loop.sample_tokens` (inverse transform sampling, one uniform a row, in the logits'
memory). They draw different tokens from the same distribution ("same draws" says whether they coincide here).

Run it at one thread (``OMP_NUM_THREADS=1``) on a quiet machine; on a shared one the numbers move with the load.

On a GPU (``--device cuda``, as ``gpu_check.py`` runs it): ``--model embedded qwen3-0.6b``, the second a random
Qwen3 of Qwen3-0.6B's shape (28 layers, hidden 1024, MLP 3072, 16 query / 8 key-value heads of 128, V = 151,936)
drawn on the device in ``--dtype`` (bf16); each ``generate`` is timed between CUDA synchronisations, and
``--greedy-prompts`` prompts check that the loop's greedy ids equal ``generate``'s (the share of equal rows: 1.0 in
float32, bf16 may break a near-tie differently). ``--out DIR`` appends the engines' rows to
``DIR/bench_rollout_<device kind>.csv``. ``--dry-run`` runs that path on the CPU with the 0.6B shape cut to 2 layers
of width 64, 2 prompts and 6 tokens: it proves the script and measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import torch  # noqa: E402
from common import environment, write_csv  # noqa: E402

# Qwen3-0.6B's config.json: hidden_size 1024, intermediate_size 3072, 28 layers, 16 heads, 8 KV heads, head_dim 128
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=4096)  # fmt: skip
DRY_RUN_QWEN = dict(QWEN3_06B, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_key_value_heads=2, head_dim=16)  # fmt: skip
COLUMNS = ["date", "device", "device_kind", "torch", "commit", "model", "dtype", "engine", "rows", "tokens", "s",
           "tokens_per_s", "greedy_rows_equal", "note"]  # fmt: skip


def random_qwen3_06b(device: torch.device, dtype: torch.dtype, dry_run: bool):
    """A random Qwen3 of Qwen3-0.6B's shape (cut to 2 layers of width 64 in a dry run), drawn on ``device``, behind the
    embedded world's tokenizer."""
    from transformers import AutoTokenizer

    from p2o_lightning.tasks.qwen3 import random_qwen3
    from p2o_lightning.tasks.shipped_world import shipped_world

    tok = AutoTokenizer.from_pretrained(shipped_world())
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):  # 0.6B parameters drawn on a CPU take long
        model = random_qwen3(**(DRY_RUN_QWEN if dry_run else QWEN3_06B), **ids, seed=0)
    return model.to(dtype).eval(), tok


def load(model: str, device: torch.device | None = None, dtype: torch.dtype = torch.bfloat16, dry_run: bool = False):
    """``(model, tokenizer)`` of ``embedded`` (the shipped world), ``qwen3-151k`` (random weights) or ``qwen3-0.6b``
    (random, ``dtype``), eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p2o_lightning.tasks.shipped_world import shipped_world

    device = device or torch.device("cpu")
    if model == "qwen3-0.6b":
        return random_qwen3_06b(device, dtype, dry_run)
    if model == "qwen3-151k":
        from common import qwen3_151k_path

        path = qwen3_151k_path()
    else:
        path = shipped_world() if model == "embedded" else Path(model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval(), tok


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_rows_equal(engines: dict, prompts: list[str], k: int, new_tokens: int) -> float:
    """The share of rows whose greedy response ids are equal between the loop's K rollouts and ``generate`` on the
    prompts repeated K times (``generate`` refuses greedy with num_return_sequences > 1)."""
    from p2o_lightning.rollout import SamplingParams

    ours = engines["loop"].generate(prompts, SamplingParams(k, 0.0, 1.0, new_tokens))
    theirs = engines["hf generate"].generate(
        [p for p in prompts for _ in range(k)], SamplingParams(1, 0.0, 1.0, new_tokens)
    )
    width = min(ours.response_ids.shape[1], theirs.response_ids.shape[1])
    return (ours.response_ids[:, :width] == theirs.response_ids[:, :width]).all(dim=1).float().mean().item()


@torch.no_grad()
def time_engines(args: argparse.Namespace, model_name: str | None = None) -> list[dict]:
    from p2o_lightning.rollout import HFRolloutEngine, LoopRolloutEngine, SamplingParams
    from p2o_lightning.tasks.addition import world_splits

    device = torch.device(args.device)
    model, tok = load(model_name or args.model[0], device, getattr(torch, args.dtype), args.dry_run)
    prompts = [p.prompt for p in world_splits()["train"][: args.prompts]]
    sampling = SamplingParams(args.k, 1.0, 1.0, args.new_tokens)
    engines = {"loop": LoopRolloutEngine(model, tok), "hf generate": HFRolloutEngine(model, tok)}
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[int]] = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):  # round 0 warms up (and runs the loop's first-batch check)
        for name, engine in engines.items():
            torch.manual_seed(round_)
            synchronize(device)
            start = time.perf_counter()
            rollouts = engine.generate(prompts, sampling)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_:
                seconds[name].append(elapsed)
                tokens[name].append(int(rollouts.response_mask.sum()))
    greedy = greedy_rows_equal(engines, prompts[: args.greedy_prompts], args.k, args.new_tokens)
    rows = []
    for name in engines:
        s, n = statistics.median(seconds[name]), statistics.median(tokens[name])
        rows.append({"engine": name, "rows": len(prompts) * args.k, "tokens": n, "s": s, "tokens_per_s": n / s,
                     "greedy_rows_equal": greedy, "model": model_name or args.model[0],
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")})  # fmt: skip
    return rows


def multinomial_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop's sampler before issue 26: log-softmax, its ``exp`` and ``torch.multinomial``, then a gather."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = torch.multinomial(logp.exp(), num_samples=1)
    return token.squeeze(1), logp.gather(1, token).squeeze(1)


def time_sampling(rows: int, vocab: int, repeats: int) -> list[dict]:
    from p2o_lightning.rollout.loop import sample_tokens

    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 4
    samplers = {
        "torch.multinomial (before)": multinomial_reference,
        "sample_tokens": lambda x: sample_tokens(x, 1.0, 1.0),
    }
    times: dict[str, list[float]] = {name: [] for name in samplers}
    draws = {}
    for rep in range(repeats + 1):
        for name, fn in samplers.items():
            torch.manual_seed(rep)
            x = logits.clone()  # sample_tokens may reuse its logits' memory, as the loop lets it
            start = time.perf_counter()
            draws[name] = fn(x)
            if rep:
                times[name].append(time.perf_counter() - start)
    (ref_tok, ref_logp), (tok, logp) = draws.values()
    same = bool(torch.equal(ref_tok, tok) and torch.equal(ref_logp, logp))
    return [
        {"sampler": name, "rows": rows, "vocab": vocab, "ms": 1e3 * statistics.median(t), "same_draws": same}
        for name, t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["qwen3-151k"],
                        help="qwen3-151k (random), embedded, qwen3-0.6b (random, --dtype), or a path")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine, after one warm-up round")
    parser.add_argument("--sampling-repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="bfloat16", help="qwen3-0.6b's dtype (the others load in float32)")
    parser.add_argument("--greedy-prompts", type=int, default=4, help="prompts of the greedy-ids check")
    parser.add_argument("--out", type=Path, default=None, help="append the engines' rows to a CSV in this folder")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny; proves the GPU path, measures nothing")
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.prompts, args.k, args.new_tokens, args.rounds = "cpu", 2, 2, 6, 1
        args.sampling_repeats, args.greedy_prompts = 1, 2
    device = torch.device(args.device)
    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}")

    records = []
    for model_name in args.model:
        rows = time_engines(args, model_name)
        print(f"\nRollouts on {model_name} ({rows[0]['dtype']}, {args.device}): {args.prompts} prompts x K={args.k}, "
              f"up to {args.new_tokens} new tokens, T=1")  # fmt: skip
        print(f"{'engine':<14}{'rows':>6}{'tokens':>8}{'s / generate':>14}{'tokens/s':>10}")
        for r in rows:
            print(f"{r['engine']:<14}{r['rows']:>6}{r['tokens']:>8.0f}{r['s']:>14.3f}{r['tokens_per_s']:>10.0f}")
        loop, hf = rows
        print(f"loop / hf generate: {loop['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s; greedy rows equal to "
              f"generate's: {loop['greedy_rows_equal']:.3f}")  # fmt: skip
        note = "dry run: not a measurement" if args.dry_run else f"median of {args.rounds} rounds"
        records += [dict(env, **r, note=note) for r in rows]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(records, args.out / f"bench_rollout_{env['device_kind']}.csv", COLUMNS)

    vocab = 151936
    print(f"\nOne decode step's sampling, [{args.prompts * args.k}, {vocab}] float32 logits, T=1 (CPU)")
    print(f"{'sampler':<28}{'ms':>8}  same draws")
    for r in time_sampling(args.prompts * args.k, vocab, args.sampling_repeats):
        print(f"{r['sampler']:<28}{r['ms']:>8.2f}  {r['same_draws']}")


if __name__ == "__main__":
    main()
