"""``python -m p2o_lightning``: see :mod:`p2o_lightning.cli`."""

from p2o_lightning.cli import main

if __name__ == "__main__":
    main()
