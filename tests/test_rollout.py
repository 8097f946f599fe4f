"""Rollout engines and on-policy hygiene: sampling log-probs, a fresh generation config, TIS, real-shaped checkpoints.

vLLM itself is tested in ``test_vllm.py`` (marker ``vllm``, its own venv); everything here runs in the dev venv.
"""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import response_logprobs
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForCausalLM, AutoTokenizer

from p2o_lightning.data import PromptDataModule, load_problems
from p2o_lightning.loss import LossSettings
from p2o_lightning.module import P2OModule
from p2o_lightning.ops import policy_loss, tis_weights
from p2o_lightning.policy import resolve_model_path
from p2o_lightning.rollout import HFRolloutEngine, SamplingParams
from p2o_lightning.settings import RolloutSettings, UpdateSettings, ValidationSettings
from p2o_lightning.tasks.math import MathTask
from p2o_lightning.tasks.math_data import KINDS, write_math_jsonl


def load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hf_sampling_logprobs_are_the_policy_s(tiny_world, temperature):
    model, tok = load(tiny_world)
    torch.manual_seed(0)
    rollouts = HFRolloutEngine(model, tok).generate(["12+34=", "5+6="], SamplingParams(4, temperature, 1.0, 10))
    expected = response_logprobs(model, rollouts, temperature)  # full-logit forward, the oracle
    assert rollouts.sampling_logp.shape == rollouts.response_ids.shape
    assert (rollouts.sampling_logp * (1 - rollouts.response_mask)).abs().max() == 0  # 0 on padding
    torch.testing.assert_close(rollouts.sampling_logp, expected, atol=1e-5, rtol=0)


def test_hf_sampling_logprobs_under_top_p_are_renormalised(tiny_world):
    model, tok = load(tiny_world)
    torch.manual_seed(0)
    rollouts = HFRolloutEngine(model, tok).generate(["12+34="] * 4, SamplingParams(4, 1.0, 0.5, 10))
    full = response_logprobs(model, rollouts)
    gap = (rollouts.sampling_logp - full) * rollouts.response_mask  # = -log(nucleus mass) >= 0
    assert gap.min() >= -1e-5 and gap.max() > 1e-3


def test_rollouts_ignore_the_checkpoint_s_generation_defaults(bpe_checkpoint, math_rows):
    model, tok = load(bpe_checkpoint)
    assert model.generation_config.repetition_penalty == 1.3  # the checkpoint asks for it
    prompts = [r["prompt"] for r in math_rows[:3]]
    engine = HFRolloutEngine(model, tok)
    torch.manual_seed(0)
    rollouts = engine.generate(prompts, SamplingParams(2, 1.0, 1.0, 16))
    torch.testing.assert_close(rollouts.sampling_logp, response_logprobs(model, rollouts), atol=1e-5, rtol=0)
    assert model.generation_config.repetition_penalty == 1.3  # restored after sampling
    # Control: plain `generate` inherits the penalty, and its sampling distribution is not the policy's.
    prompt_ids, prompt_mask = engine.encode_prompts(prompts, torch.device("cpu"))
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=16, do_sample=True, top_k=0,
        output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    sampled = out.sequences[:, prompt_ids.shape[1] :]
    inherited = torch.stack(
        [s.log_softmax(-1).gather(1, sampled[:, i : i + 1])[:, 0] for i, s in enumerate(out.scores)], 1
    )
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits
    full = logits[:, prompt_ids.shape[1] - 1 : -1].log_softmax(-1).gather(2, sampled[..., None])[..., 0]
    assert (inherited - full).abs().max() > 0.05


def test_chat_template_is_rendered_for_a_tokenizer_that_has_one(bpe_checkpoint):
    model, tok = load(bpe_checkpoint)
    engine = HFRolloutEngine(model, tok)
    assert engine.render(["What is 2+2?"]) == ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
    ids, _ = engine.encode_prompts(["What is 2+2?"], torch.device("cpu"))
    assert tok.decode(ids[0]) == engine.render(["What is 2+2?"])[0]  # no extra BOS / EOS around the template
    assert engine.eos_token_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_tis_weights_by_hand():
    old = torch.tensor([[0.5, 0.9, 0.2, 0.3]]).log()
    rollout = torch.tensor([[0.25, 0.9, 0.8, 1e-30]]).log()
    # ratios π_old / π_rollout: [2.0, 1.0, 0.25, 3e29]; capped at C = 1.5 -> [1.5, 1.0, 0.25, 1.5]
    w = tis_weights(old, rollout, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.0, 0.25, 1.5]]))
    with pytest.raises(ValueError, match="tis_cap"):
        tis_weights(old, rollout, cap=0.0)


def test_tis_through_token_advantages_scales_the_policy_gradient_term():
    # one sequence, 3 tokens, π = π_old (ratio 1, no clipping), advantage 1, TIS weights [1.5, 1.0, 0.25]:
    # per-token pg = -A·w·ratio = [-1.5, -1.0, -0.25]; token-mean = -2.75 / 3
    logp = torch.tensor([[0.5, 0.9, 0.2]]).log().requires_grad_()
    w = torch.tensor([[1.5, 1.0, 0.25]])
    loss, _ = policy_loss(logp, logp.detach(), torch.ones(1)[:, None] * w, torch.ones(1, 3), LossSettings())
    assert loss.item() == pytest.approx(-2.75 / 3)
    loss.backward()  # d/dlogp of -A·w·exp(logp - old) at ratio 1 = -w / 3
    torch.testing.assert_close(logp.grad, -w / 3)
    # a negative advantage with a ratio in the clipped region: clipping picks the same branch with or without w
    logp2 = torch.tensor([[0.0, 0.0]])
    old2 = torch.tensor([[math.log(2.0), 0.0]])  # ratios [0.5, 1.0]
    settings = LossSettings(clip_high=0.2, loss_agg="seq-mean-token-sum")
    plain, _ = policy_loss(logp2, old2, -torch.ones(1), torch.ones(1, 2), settings)
    weighted, _ = policy_loss(logp2, old2, -torch.tensor([[2.0, 2.0]]), torch.ones(1, 2), settings)
    # A=-1: pg = max(0.5, 0.8) + max(1, 1) = 1.8; with w=2 on both tokens: 3.6
    assert plain.item() == pytest.approx(1.8) and weighted.item() == pytest.approx(3.6)


def test_model_path_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_model_path(str(tmp_path / "nowhere"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a model")
    with pytest.raises(ValueError, match="notes.*no config.json"):
        resolve_model_path(str(tmp_path / "notes"))
    with pytest.raises(ValueError, match="tis_cap"):
        P2OModule(model="embedded", rollout=RolloutSettings(tis_cap=-1.0))


def test_math_problems_are_mixed_and_graded(math_rows, tmp_path):
    assert len(math_rows) >= 200 and {r["kind"] for r in math_rows} == set(KINDS)
    assert len({r["prompt"] for r in math_rows}) == len(math_rows)
    assert all("\\boxed{}" in r["prompt"] for r in math_rows)
    assert any(r["answer"].startswith("\\frac") or "\\frac" in r["answer"] for r in math_rows)  # fractions
    assert any("\\sqrt" in r["answer"] for r in math_rows) and any("." in r["answer"] for r in math_rows)
    assert any(r["answer"].startswith("-") for r in math_rows)
    task = MathTask()
    for row in math_rows:
        assert task.score(f"So the answer is $\\boxed{{{row['answer']}}}$.", row["answer"]).reward == 1.0, row
        assert task.score("So the answer is $\\boxed{10007}$.", row["answer"]).reward == 0.0, row
    # equivalent forms verify: 7/12 written inline, 6√2 as sqrt(72)
    assert task.score("\\boxed{7/12}", "\\frac{7}{12}").reward == 1.0
    assert task.score("\\boxed{\\sqrt{72}}", "6\\sqrt{2}").reward == 1.0
    path = write_math_jsonl(tmp_path / "math.jsonl", n=240)
    problems = load_problems(path)
    assert [p.answer for p in problems] == [r["answer"] for r in math_rows]
    with pytest.raises(FileExistsError, match="math.jsonl"):
        write_math_jsonl(path)
    assert json.loads(path.read_text().splitlines()[0])["kind"] == "integer"


@pytest.mark.slow
def test_math_steps_on_a_bpe_checkpoint_log_the_rollout_mismatch(bpe_checkpoint, tmp_path):
    """GRPO on our math JSONL with a BPE + chat-template checkpoint, TIS on: the engine's log-probs match the
    trainer's (HF shares the weights), so the TIS weights are 1 and the mismatch is ~0."""
    train = write_math_jsonl(tmp_path / "train.jsonl", n=200, seed=1)
    dev = write_math_jsonl(tmp_path / "dev.jsonl", n=8, seed=2)
    L.seed_everything(0)
    module = P2OModule(
        model=str(bpe_checkpoint), task="math",
        rollout=RolloutSettings(num_rollouts=2, max_new_tokens=12, tis_cap=2.0, reward_timeout=5.0),
        update=UpdateSettings(micro_batch_size=8), validation=ValidationSettings(num_samples=0),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )  # fmt: skip
    data = PromptDataModule(task="math", train_file=str(train), val_files={"dev": str(dev)}, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path, name="run", version=""), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        val_check_interval=2, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r.get("train/rollout_logprob_diff")]
    assert len(rows) == 2
    for row in rows:
        assert float(row["train/rollout_logprob_diff"]) < 1e-4
        assert float(row["train/tis_weight_mean"]) == pytest.approx(1.0, abs=1e-4)
        assert float(row["train/tis_capped_frac"]) == 0.0
    assert module.engine.use_chat_template


def test_the_8gpu_config_carries_the_paper_s_settings():
    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "qwen3-4b-deepscaler-8gpu.yaml").read_text())
    model, trainer = config["model"], config["trainer"]
    assert trainer["devices"] == 8 and trainer["strategy"]["class_path"] == "p2o_lightning.sharded.FSDP2Strategy"
    rollout, update = model["rollout"], model["update"]
    assert (rollout["num_rollouts"], rollout["temperature"], rollout["max_new_tokens"]) == (6, 0.6, 12288)
    assert model["optimizer"]["init_args"]["lr"] == 1e-6 and update["warmup_steps"] == 0.05
    assert model["loss"]["kl_coef"] == 0.0
    assert config["data"]["batch_size"] * 8 == 128 and update["ppo_mini_batch_size"] * 8 == 64
    assert rollout["engine"] == "vllm" and rollout["tis_cap"] == 2.0 and trainer["max_epochs"] == 10
    p2o = next(c for c in trainer["callbacks"] if c["class_path"].endswith("P2OCallback"))["init_args"]
    schedule, search = p2o["schedule"], p2o["search"]
    assert (schedule["tau"], schedule["min_hard_samples"], search["dev_size"], search["parents_per_iteration"]) == (
        2, 100, 300, 16,
    )  # fmt: skip
    assert p2o["reflection"]["class_path"].endswith("TeacherReflection")
