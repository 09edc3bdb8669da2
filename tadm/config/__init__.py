"""Config building: YAML -> objects. Plug-in discovery and short names (:mod:`~tadm.config.plugins`),
argument links and the model / backbone a config describes (:mod:`~tadm.config.build`), and a
checkpoint rebuilt for inference (:mod:`~tadm.model.loading`).

May import the core (model, inference, evaluation) and everything below it; never the commands.
"""
