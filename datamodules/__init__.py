"""Data (installed as ``tadm.datamodules``): image decoding (``image_io``), image folders for small sets
(``image_folder``), WebDataset shards for streaming at scale (the format ``shards``, the writer
``shard_writer``, the streams ``shard_streams`` with ``placement``, ``shard_crops`` and ``shard_loader``,
the data module ``webdataset``), the bad-input policy both data modules share (``bad_input``), the training
position they write into checkpoints and resume on any number of processes (``elastic``), and the inputs of
the commands (``inputs``).

May import only the bottom layer (:mod:`tadm.contracts`, :mod:`tadm.ops`, :mod:`tadm.errors`).
"""

# Python started in the repository's root also finds this folder as ``datamodules``; its modules would load
# twice under two names (each plug-in registered twice, two copies of every class): one name only.
if __name__ != "tadm.datamodules":
    raise ImportError(
        f"import tadm.datamodules, not {__name__}: the repository's top-level datamodules/ folder is "
        "the package tadm.datamodules; importing it under a second name would load (and register) its "
        "modules twice"
    )
