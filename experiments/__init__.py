"""The experiments: the MoE-layer benchmark (`bench/`), the papers' comparison (`repro/`) and
fine-tuning on a labelled set (`finetune.py`).

They use the core (moe, parallel, data, common) and the launcher; nothing outside experiments/ and
tests/ imports them. The `competesmoe` command finds their sub-commands through the
`competesmoe.commands` entry points of pyproject.toml (see launcher/cli.py).
"""
