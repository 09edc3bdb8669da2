"""Studies: a study file -> its cells and their commands, and the comparison of finished runs' reports
(``tadm study`` and ``tadm compare``).

May import :mod:`tadm.model` and everything below it; never the commands, training or the test kit.
"""
