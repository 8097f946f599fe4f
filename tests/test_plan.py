"""P²O's rollout plan (which prompt a row is sampled and trained under) and why mixed groups matter, by hand."""

import pytest
import torch
from helpers import small_module

from p2o_lightning import ops
from p2o_lightning.loss import LossSettings
from p2o_lightning.step.batch import RolloutBatch
from p2o_lightning.step.plan import plan_rollouts, rows_in_loss
from p2o_lightning.step.score import score_groups


def test_plan_rows_by_hand():
    assignments = {"2+2=": ["A.", "B.", "A.", "C."]}
    plan = plan_rollouts(["1+1=", "2+2="], assignments, num_rollouts=4, plain_rollouts=1)
    # group 0 (rows 0-3): "1+1=" holds no templates: GRPO's rows, sampled and trained on x
    # group 1 (rows 4-7): "2+2=" sampled under A., B., A. and (plain_rollouts=1) its last row under x itself;
    #                     all four trained on x (distillation)
    assert plan.templates == ["", "", "", "", "A.", "B.", "A.", ""]
    assert plan.sampled_prompts == ["1+1="] * 4 + ["A.\n\n2+2=", "B.\n\n2+2=", "A.\n\n2+2=", "2+2="]
    assert plan.trained_prompts == ["1+1="] * 4 + ["2+2="] * 4
    assert plan.templated_groups == [False, True]
    assert plan.templated_rows == [False] * 4 + [True, True, True, False]
    assert plan.distilled_rows == [False] * 4 + [True, True, True, False]
    # no distillation (the paper's ablation): trained on the prompt it was sampled under
    plan = plan_rollouts(["1+1=", "2+2="], assignments, num_rollouts=4, plain_rollouts=0, distill=False)
    assert plan.trained_prompts == plan.sampled_prompts == ["1+1="] * 4 + ["A.\n\n2+2=", "B.\n\n2+2=", "A.\n\n2+2=",
                                                                        "C.\n\n2+2="]  # fmt: skip
    assert not any(plan.distilled_rows)
    # the seed template drawn into a group (as the reference) is a plain row: sampled and trained on x
    plan = plan_rollouts(["2+2="], {"2+2=": ["", "A.", "", "A."]}, num_rollouts=4)
    assert plan.distilled_rows == [False, True, False, True] and plan.templated_groups == [True]
    # a prompt whose K draws were all the seed holds no templates
    assert not plan_rollouts(["2+2="], {"2+2=": [""] * 4}, num_rollouts=4).any_templated


def test_plan_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"3 templates assigned to prompt '2\+2=' but num_rollouts=4"):
        plan_rollouts(["2+2="], {"2+2=": ["A."] * 3}, num_rollouts=4)
    with pytest.raises(ValueError, match=r"plain_rollouts=5 must be in \[0, num_rollouts=4\]"):
        plan_rollouts(["2+2="], {}, num_rollouts=4, plain_rollouts=5)


def test_rows_in_loss_drops_failed_templated_rows_only():
    plan = plan_rollouts(["1+1=", "2+2="], {"2+2=": ["A."] * 4}, num_rollouts=4, plain_rollouts=2)
    rewards = [0.0, 1.0, 0.0, 0.0] + [1.0, 0.0, 0.0, 1.0]
    # rows 4, 5 are templated: row 5 failed and leaves the loss; plain rows (0-3 and 6-7) always stay
    assert rows_in_loss(plan, rewards, drop_failed_templated=True) == [True] * 5 + [False, True, True]
    assert rows_in_loss(plan, rewards) == [True] * 8
    with pytest.raises(ValueError, match="3 rewards for a plan of 8 rows"):
        rows_in_loss(plan, rewards[:3])


def test_nonnegative_plain_advantage_zeroes_failed_plain_rows_of_templated_groups_only():
    plan = plan_rollouts(["1+1=", "2+2="], {"2+2=": ["A."] * 4}, num_rollouts=4, plain_rollouts=2)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    m, ids = 8, torch.zeros(8, 2, dtype=torch.long)
    batch = RolloutBatch(plan, ["2"] * m, ids, ids, ids, ids, ids, torch.ones(m, 2), [""] * m, rewards)
    group = score_groups(batch, ops, norm_by_std=False).advantages
    # Dr. GRPO's r - mean: group 0 (plain, mean 1/4) [3/4, -1/4, -1/4, -1/4]; group 1 (mean 3/4) templated rows
    # [1/4, 1/4] and plain rows [-3/4, 1/4]
    assert group.tolist() == [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25]
    nonneg = score_groups(batch, ops, norm_by_std=False, plain_advantage="nonnegative").advantages
    # only the failed plain row of the templated group (row 6) changes: -3/4 -> 0; GRPO's group 0 keeps its signs
    assert nonneg.tolist() == [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.0, 0.25]
    with pytest.raises(ValueError, match="plain_advantage='zero' is unknown"):
        small_module("/does/not/exist", plain_advantage="zero")  # checked before the model path


def _opening_gradient(plain_rollouts: int) -> torch.Tensor:
    """∂loss/∂θ of the first response token's logits θ = log π(· | x) for one templated group of K = 4.

    Templated rows open with token 0 (the scratchpad the template elicits), plain rows with token 1 (a direct
    answer); the context (x, nothing before the first token) is the same in every row, so all rows share θ.
    """
    plan = plan_rollouts(["9+9="], {"9+9=": ["Carry."] * 4}, num_rollouts=4, plain_rollouts=plain_rollouts)
    first_token = torch.tensor([0 if t else 1 for t in plan.templated_rows])  # [4]
    # two rollouts succeed, two fail: mean 0.5 and advantages ±a, exactly
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    advantages = ops.group_advantage(rewards).view(4)
    theta = torch.zeros(2, requires_grad=True)
    logp = torch.log_softmax(theta, dim=0)[first_token][:, None]  # [4, 1] log π(first token | x)
    loss, _ = ops.policy_loss(logp, logp.detach(), advantages, torch.ones(4, 1), LossSettings())
    loss.backward()
    return theta.grad


def test_shared_opening_gets_no_gradient_unless_the_group_is_mixed():
    # all 4 rows templated: every row opens with token 0, Σ_i A_i = a + a − a − a = 0, so the opening's gradient
    # Σ_i A_i ∇log π(0 | x) / 4 is exactly zero: distillation cannot teach x to open the scratchpad
    assert torch.equal(_opening_gradient(plain_rollouts=0), torch.zeros(2))
    # 2 of 4 sampled from x: the templated rows (rewards 1, 1, A = +a) open with 0, the plain ones (0, 0, −a)
    # with 1; descending the loss raises log π(0 | x): ∂loss/∂θ_0 < 0 < ∂loss/∂θ_1
    grad = _opening_gradient(plain_rollouts=2)
    assert grad[0] < 0 < grad[1]
    # by hand: loss = −(a·log p0 + a·log p0 − a·log p1 − a·log p1) / 4 with p0 = p1 = ½, a = 0.5 / std
    a = 0.5 / (torch.tensor([1.0, 1.0, 0.0, 0.0]).std() + 1e-6)
    torch.testing.assert_close(grad, torch.stack([-a / 2, a / 2]))
