"""Datasets, splits, transforms, input preparation and phantoms."""
