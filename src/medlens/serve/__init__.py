"""``medlens serve``: an interactive viewer in the browser (FastAPI app + plain HTML/JS page)."""

from medlens.serve.app import Limits, ServedModel, create_app, parse_bytes, served_model, sniff

__all__ = ["Limits", "ServedModel", "create_app", "parse_bytes", "served_model", "sniff"]
