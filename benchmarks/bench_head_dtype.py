"""The numerical error of the bf16 head (``head_dtype: bfloat16`` of the fused head) against the float32 head.

The fused head of a single update (:mod:`p2o_lightning.fused_head`) can run its three matmuls — logits, ∂L/∂z · W and
∂L/∂zᵀ · h — on bf16 operands, with the softmax and the weight gradient's accumulation in float32. That is for CPUs
with bf16 matrix units (AMX, AVX512-BF16) and GPUs; this script measures what it costs in accuracy, on:

- ``embedded``: the shipped embedded world's real last hidden states and LM head (V = its character vocabulary),
  teacher-forced on prompt + answer text of its training split;
- ``random-151k``: random hidden states and a random head with Qwen's 151,936-token vocabulary (logits of std ~3, a
  peaked softmax), H = 256 (the width of bench_vs_trl.py's qwen3-151k; ``--widths`` for others), 128 tokens: torch's
  bf16 matmul ran at 0.3 GFLOP/s on this CPU (AVX2, no bf16 units) against 26 for float32, so larger runs take long.

For each: max and mean |Δ| of the per-token log-probs and entropies over the response tokens, and the relative L2
error ‖Δ‖ / ‖·‖ of the loss and of the gradients w.r.t. hidden states and the head weight, bf16 against float32; and
as a scale, the float32 head against a float64 one (the loss: token-mean PPO at ratio 1 with random advantages and a
k3 KL term). Also the wall time of each head, measured here — on a CPU **without** bf16 matrix units (the bf16 matmuls
are emulated), so it says nothing of the speed on one with them.

    python benchmarks/bench_head_dtype.py [--threads 1] [--tokens 128] [--widths 256 1024]

Prints a table, appends ``benchmarks/results/bench_head_dtype_<device>.csv`` and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN_VOCAB, environment, write_csv  # noqa: E402

from p2o_lightning.fused_head import RatioOneLoss, fused_linear_policy_loss  # noqa: E402
from p2o_lightning.loss import LossSettings  # noqa: E402
from p2o_lightning.ops import policy_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def embedded_inputs(n_texts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden (B, T, H), weight (V, H), targets (B, T)) of the shipped world on prompt + answer texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p2o_lightning.tasks.addition import world_splits
    from p2o_lightning.tasks.shipped_world import shipped_world

    path = shipped_world()
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = [p.prompt + p.answer for p in world_splits()["train"][:n_texts]]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = lm.get_decoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    targets = enc.input_ids[:, 1:].masked_fill(enc.attention_mask[:, 1:] == 0, -100)
    return hidden[:, :-1].contiguous(), lm.get_output_embeddings().weight.detach(), targets


def random_inputs(n: int, h: int, v: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / math.sqrt(h) * 3
    return hidden, weight, torch.randint(0, v, (1, n), generator=gen)


def run_head(hidden, weight, targets, loss, head_dtype):
    """(loss, logp, entropy, grad_hidden, grad_weight, seconds) of the fused head with ``head_dtype``."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    value, logp, entropy = fused_linear_policy_loss(
        hidden, weight, targets, loss, return_entropy=True, head_dtype=head_dtype
    )
    grad_hidden, grad_weight = torch.autograd.grad(value, [hidden, weight])
    seconds = time.perf_counter() - start
    return value.detach().double(), logp.double(), entropy.double(), grad_hidden.double(), grad_weight.double(), seconds


def float64_head(hidden, weight, targets, advantages, ref, kl_coef, cols=64):
    """The oracle: float64 log-softmax of full logits, ``policy_loss`` at ratio 1 through autograd, ``cols`` token
    columns at a time (token-mean over all tokens: the chunks' losses add up to the whole's).
    """
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    valid = targets != -100
    logps, ents, total = [], [], 0.0
    for c in range(0, targets.shape[1], cols):
        t = targets[:, c : c + cols]
        ok = t != -100
        logprobs = (h[:, c : c + cols] @ w.T).log_softmax(-1)  # (B, C, V)
        logp = logprobs.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * ok
        ents.append((-(logprobs.exp() * logprobs).sum(-1) * ok).detach())
        loss, _ = policy_loss(
            logp, logp.detach(), advantages.double(), ok, LossSettings(kl_coef=kl_coef, kl_estimator="k3"),
            ref_logp=ref[:, c : c + cols].double(), num_tokens=valid.sum().double(),
        )  # fmt: skip
        loss.backward()
        total += float(loss.detach())
        logps.append(logp.detach())
    return torch.tensor(total), torch.cat(logps, 1), torch.cat(ents, 1), h.grad, w.grad, float("nan")


def errors(test, base, valid) -> dict[str, float]:
    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    (loss, logp, ent, gh, gw, _), (loss0, logp0, ent0, gh0, gw0, _) = test, base
    d_logp, d_ent = (logp - logp0)[valid].abs(), (ent - ent0)[valid].abs()
    return {
        "logp_max_abs": float(d_logp.max()),
        "logp_mean_abs": float(d_logp.mean()),
        "entropy_max_abs": float(d_ent.max()),
        "loss_rel": float((loss - loss0).abs() / loss0.abs().clamp(min=1e-30)),
        "grad_hidden_rel": rel(gh, gh0),
        "grad_weight_rel": rel(gw, gw0),
    }


def measure(name: str, hidden, weight, targets) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    valid = targets != -100
    advantages = torch.randn(targets.shape[0], generator=gen)
    with torch.no_grad():  # π_ref: the true log-probs, perturbed
        _, logp, _ = fused_linear_policy_loss(
            hidden, weight, targets, RatioOneLoss.of(advantages, valid.float(), LossSettings())
        )
    ref = logp + 0.1 * torch.randn(logp.shape, generator=gen)
    loss = RatioOneLoss.of(advantages, valid.float(), LossSettings(kl_coef=0.05, kl_estimator="k3"), ref_logp=ref)
    heads = {
        "float64": float64_head(hidden, weight, targets, advantages, ref, kl_coef=0.05),
        "float32": run_head(hidden, weight, targets, loss, torch.float32),
        "bfloat16": run_head(hidden, weight, targets, loss, torch.bfloat16),
    }
    n, (v, h) = int(valid.sum()), weight.shape
    rows = []
    for test, base in (("float32", "float64"), ("bfloat16", "float32")):
        row = dict(inputs=name, tokens=n, H=h, V=v, head=test, against=base)
        row.update(errors(heads[test], heads[base], valid))
        row["head_ms"] = heads[test][5] * 1e3
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--tokens", type=int, default=128, help="tokens of the random 151,936-vocabulary inputs")
    parser.add_argument("--widths", type=int, nargs="+", default=[256], help="H of the random inputs")
    parser.add_argument("--texts", type=int, default=64, help="training texts of the embedded world")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags.split()]
    env["bf16_units"] = " ".join(units) or "none"
    rows = measure("embedded", *embedded_inputs(args.texts))
    for h in args.widths:
        rows += measure(f"random-151k H={h}", *random_inputs(args.tokens, h, QWEN_VOCAB))
    rows = [{**env, **r} for r in rows]

    print(f"\nfused head, bf16 vs float32 (and float32 vs float64), {env['device']}, bf16 units: {env['bf16_units']}")
    cols = ("logp_max_abs", "logp_mean_abs", "entropy_max_abs", "loss_rel", "grad_hidden_rel", "grad_weight_rel")
    print(f"{'inputs':>20} {'tokens':>6} {'head':>9} {'vs':>8} " + " ".join(f"{c:>15}" for c in cols) + "  head ms")
    for r in rows:
        cells = " ".join(f"{r[c]:>15.2e}" for c in cols)
        print(f"{r['inputs']:>20} {r['tokens']:>6} {r['head']:>9} {r['against']:>8} {cells} {r['head_ms']:>8.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_csv(rows, RESULTS / f"bench_head_dtype_{env['device_kind']}.csv", list(rows[0]))
    print(json.dumps([{k: r[k] for k in ("inputs", "head", "against", *cols)} for r in rows]))


if __name__ == "__main__":
    main()
