"""The stages of one RL step, each in a module named for it (see ``shared/DESIGN.md``)."""
