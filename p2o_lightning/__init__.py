"""p2o-lightning: GRPO and P²O (joint policy and prompt optimization) for RLVR, as Lightning components.

- :class:`~p2o_lightning.module.P2OModule`: the LightningModule (policy + frozen reference, rollouts, PPO-clip).
- :class:`~p2o_lightning.data.PromptDataModule`: prompts and gold answers.
- :mod:`p2o_lightning.ops`: the reference ops (chunked log-prob, group advantage, PPO-clip + KL loss).
- :mod:`p2o_lightning.tasks`: verifiable tasks, including the embedded world the default run loads (shipped).
"""

__version__ = "0.1.0"
