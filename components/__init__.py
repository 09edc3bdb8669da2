"""Plug-ins, one sub-package per kind: ``rescalers/``, ``backbones/``, ``aligners/``.

Installed as ``tadm.components`` (the repository keeps the folder at its top level). A plug-in
module subclasses a contract of :mod:`tadm.contracts` and registers a short name; every module here
is imported by :func:`tadm.config.plugins.load_plugins`. Plug-ins may import only the bottom layer
(:mod:`tadm.contracts`, :mod:`tadm.ops`, :mod:`tadm.errors`), and one kind never imports another.
"""
