"""Refuses the top-level name ``kernels``: this folder is ``p2o_lightning.kernels``, never the PyPI package.

The folder has no ``__init__.py``, so where the PyPI package ``kernels`` is installed, ``import kernels`` is always
that package. Where it is not, Python run from the repository root still finds this folder as a namespace package
named ``kernels``; every kernel module imports this one first, so ``import kernels.logprob`` fails there with this
message instead of loading our code under a name that is not ours.
"""

if __name__ != "p2o_lightning.kernels._guard":
    raise ImportError(
        f"{__name__}: the Triton kernels of p2o-lightning are imported as p2o_lightning.kernels, never as a "
        "top-level 'kernels' (that name is the PyPI package transformers uses)"
    )
