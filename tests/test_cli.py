"""The command line imports only the command it runs: --help and --version import no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from densenet import cli
try:
    cli.main({argv!r})
except SystemExit:
    pass
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("densenet.")))
"""


def imported(argv: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         check=True).stdout
    return eval(out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_help_and_version_import_no_command_and_no_torch(argv):
    assert imported(argv) == ["densenet.cli", "densenet.errors"]


def test_a_command_imports_its_own_module_only():
    modules = imported(["analyze", "--list"])
    assert "densenet.analysis" in modules and "torch" in modules
    for other in ("densenet.train", "densenet.export", "densenet.report", "densenet.sweep", "densenet.bench"):
        assert other not in modules
