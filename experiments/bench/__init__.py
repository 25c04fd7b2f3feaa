"""`competesmoe bench`: benchmarks, one module per concern.

- `cli.py`: the command (`bench moe-layer` and its options), spawning the ranks, printing the report;
- `moe_layer.py`: what each rank measures, one (EP size, top-K) cell at a time;
- `measure.py`: interleaved timing, peak memory, the machine's description;
- `comm_counter.py`: the bytes every c10d collective of a step sends to the other ranks;
- `report.py`: the tables and the summary of ratios (the targets they are read against: docs/benchmarks.md).
"""
