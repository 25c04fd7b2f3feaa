"""Parallelism: process groups, token transports (local, all-to-all, all-gather), the parallelize step."""
