"""WebDataset pipelines and the on-disk dataset contract."""
