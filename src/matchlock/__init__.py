"""Matchlock: disposable micro-VMs for AI agents, with a sealed network."""

__version__ = "0.1.0"
