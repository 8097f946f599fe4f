"""P²O's discrete half: GEPA prompt evolution on hard samples, and which templates each hard sample gets.

- :mod:`~p2o_lightning.prompt.adapter`: the ``gepa`` adapter (the current policy scores a template, greedy, 0/1).
- :mod:`~p2o_lightning.prompt.reflection`: reflection backends (teacher endpoint, frozen reference, offline).
- :mod:`~p2o_lightning.prompt.assignment`: greedy set cover and the weighted K-template assignment.
- :mod:`~p2o_lightning.prompt.search`: one GEPA search over a hard pool (no Trainer needed), and a search in a run.
- :mod:`~p2o_lightning.prompt.record`: the search's typed record, and its file in a run folder (written and read there).
- :mod:`~p2o_lightning.prompt.schedule`: the hard pool, the search trigger and the templates' lifetime (no Lightning).
"""
