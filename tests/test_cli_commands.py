"""The experiments' sub-commands reach `competesmoe` through entry points, not through imports: the command lists
bench, repro and finetune, runs them, and launcher/cli.py does not name competesmoe.experiments."""

import ast
from importlib.metadata import entry_points

from competesmoe.launcher import cli
from support import ROOT, competesmoe

REGISTERED = {"bench", "finetune", "repro"}


def test_entry_points_register_the_experiments_commands():
    entries = {e.name: e.value for e in entry_points(group=cli.COMMANDS_GROUP)}
    assert set(entries) == REGISTERED, "stale install? pip install -e . refreshes the entry points"
    assert all(value.startswith("competesmoe.experiments.") for value in entries.values()), entries


def test_the_command_lists_and_parses_them():
    result = competesmoe("--help", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    listed = result.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert REGISTERED <= set(listed) and {"train", "eval", "export"} <= set(listed), result.stdout
    parser = cli.build_parser()
    for argv in (["bench", "moe-layer", "--quick"], ["repro", "--dry-run", "--quick"],
                 ["finetune", "RUN", "--train", "t.tsv", "--valid", "v.tsv"]):
        args = parser.parse_args(argv)
        assert args.command == argv[0] and callable(args.run_command), argv
    assert not hasattr(parser.parse_args(["eval", "RUN", "--text", "f.txt"]), "run_command")


def test_repro_dry_run_goes_through_the_entry_point(tmp_path):
    result = competesmoe("repro", "--dry-run", "--quick", "--methods", "gshard", "--seeds", "1", cwd=tmp_path,
                         timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("gshard seed 1: runs/repro/quick/gshard/seed1 (to run): ")


def test_launcher_cli_does_not_import_the_experiments():
    source = (ROOT / "launcher" / "cli.py").read_text()
    tree = ast.parse(source)
    imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [m for m in imported if "experiments" in m], imported
    strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert not [s for s in strings if "competesmoe.experiments" in s], "no import by name either (importlib)"
