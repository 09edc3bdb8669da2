"""Plug-ins, one sub-package per kind: ``rescalers/``, ``backbones/``, ``aligners/``.

Installed as ``tadm.components`` (the repository keeps the folder at its top level). A plug-in
module subclasses a contract of :mod:`tadm.contracts` and registers a short name; every module here
is imported by :func:`tadm.config.plugins.load_plugins`. Plug-ins may import only the bottom layer
(:mod:`tadm.contracts`, :mod:`tadm.ops`, :mod:`tadm.errors`), and one kind never imports another.
"""

# Python started in the repository's root also finds this folder as ``components``; its modules would load
# twice under two names (each plug-in registered twice, two copies of every class): one name only.
if __name__ != "tadm.components":
    raise ImportError(
        f"import tadm.components, not {__name__}: the repository's top-level components/ folder is "
        "the package tadm.components; importing it under a second name would load (and register) its "
        "modules twice"
    )
