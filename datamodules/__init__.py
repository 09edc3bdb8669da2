"""Data modules: image folders for small sets; WebDataset shards for streaming at scale."""
