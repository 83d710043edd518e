import subprocess
import sys

import armfast
from armfast.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"armfast {armfast.__version__}"


def test_backends_command(capsys):
    assert main(["backends", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reference  available" in out and "sdpa       available" in out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "armfast.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and armfast.__version__ in result.stdout
