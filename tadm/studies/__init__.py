"""Studies, behind ``tadm study`` and ``tadm compare``: ``study_plan`` (a study file -> its cells and their
commands, and the names of the files a run leaves) and ``run_comparison`` (finished runs' reports -> one
table and plots).

May import :mod:`tadm.model` and everything below it; never the commands, training or the test kit.
"""
