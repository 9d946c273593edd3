"""Workflows over files: explain, evaluate, demo and the paper protocols."""
