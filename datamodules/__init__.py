"""Data (installed as ``tadm.datamodules``): image decoding, image folders for small sets, WebDataset
shards for streaming at scale (writer and data module), and the inputs of the commands.

May import only the bottom layer (:mod:`tadm.contracts`, :mod:`tadm.ops`, :mod:`tadm.errors`).
"""
