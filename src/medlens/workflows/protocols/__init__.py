"""Named protocols: the exact conventions of a published explanation pipeline, rerunnable."""

from medlens.workflows.protocols.attention_paper import PAPER_METHODS, paper_maps, run_protocol

__all__ = ["PAPER_METHODS", "paper_maps", "run_protocol"]
