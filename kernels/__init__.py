"""Triton kernels of p2o-lightning, installed as ``p2o_lightning.kernels`` (never as a top-level ``kernels``).

The kernels (fused linear log-prob, group advantage, fused PPO-clip + KL loss) arrive with the kernels issue;
until then :mod:`p2o_lightning.ops` holds the pure-torch reference ops that every kernel will be tested against.
"""
