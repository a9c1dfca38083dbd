"""LightningDataModules: each yields (x0, x1) batches of source and data samples."""
