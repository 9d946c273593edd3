"""The engine: capture, targets, tokens, resampling, attention capture, boxes and explain()."""
