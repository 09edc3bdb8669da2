"""Config building: YAML -> objects. Plug-in discovery and short names (:mod:`~tadm.config.plugins`),
the argument links every parser shares, and a class or a backbone built from a run config
(:mod:`~tadm.config.build`).

May import inference, evaluation and everything below them; never the model, training, studies or
commands (the model class to build is passed in).
"""
