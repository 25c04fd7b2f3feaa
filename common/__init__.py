"""The ground floor: what every other package may use and nothing here imports back.

`errors` (the one user-facing exception type), `typed_config` (dataclass configs built from YAML with
errors that name the field), `files` (hashes, atomic writes), `net` (free ports), `table` (plain-text tables).
"""
