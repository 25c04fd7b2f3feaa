"""`competesmoe repro`, the papers' comparison, one module per job:

- `grid.py`: the methods, budgets and ablations, and the grid of runs they make;
- `runner.py`: the runs as child processes, resumable;
- `analysis.py`: a finished run's checkpoint: the K sweep, router entropy, expert similarity;
- `report.py` and `figures.py`: results.md and its PNGs from the finished runs;
- `cli.py`: the command.
"""
