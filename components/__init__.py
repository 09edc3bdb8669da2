"""Plug-ins for tadm, one sub-package per kind: rescalers, backbones, aligners."""
