"""`make demo` needs only python3, make and the package registry; `make test` adds the system tools."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(target: str) -> str:
    # -B: as on a fresh clone, every step counts as out of date.
    r = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_demo_needs_no_root_and_no_compiler():
    steps = dry_run("demo")
    assert "pip install" in steps and "llama_plugin.demo" in steps
    assert "apt-get" not in steps and "id -u" not in steps and "requirements-kenlm" not in steps


def test_tests_install_the_system_tools_and_kenlm():
    steps = dry_run("test")
    assert "apt-get" in steps and "shellcheck" in steps and "requirements-kenlm.txt" in steps
    assert "kenlm" not in (ROOT / "requirements.txt").read_text()
