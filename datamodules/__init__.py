"""Data (installed as ``tadm.datamodules``): image decoding (``image_io``), image folders for small sets
(``image_folder``), WebDataset shards for streaming at scale (the format ``shards``, the writer
``shard_writer``, the streams ``shard_streams`` with ``placement`` and ``shard_loader``, the data module
``webdataset``), the bad-input policy both data modules share (``bad_input``), the training position they
write into checkpoints and resume on any number of processes (``elastic``), and the inputs of the commands
(``inputs``).

May import only the bottom layer (:mod:`tadm.contracts`, :mod:`tadm.ops`, :mod:`tadm.errors`).
"""
