"""Launcher: configuration, command line, training loop, monitoring."""
