"""The project's own set-up: generated code in sync with the notebooks, and the Java check of `make`."""
import os
import shutil
import subprocess
from pathlib import Path

from conftest import BIN, ROOT


def test_nbdev_export_changes_nothing(tmp_path):
    "serving_mlops/ (packages included) is what nbdev_export makes of nbs/ (CI fails otherwise)."
    copy = tmp_path / "repo"
    for name in ("nbs", "serving_mlops"): shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("settings.ini", "setup.py", "README.md"): shutil.copy(ROOT / name, copy / name)
    subprocess.run([str(BIN / "nbdev_export")], cwd=copy, check=True, capture_output=True)
    generated = sorted(p.relative_to(ROOT / "serving_mlops") for p in (ROOT / "serving_mlops").rglob("*.py") if "__pycache__" not in p.parts)
    assert len(generated) > 20 and Path("serving", "runtime.py") in generated  # the packages' modules are checked too
    for rel in generated:
        assert (copy / "serving_mlops" / rel).read_text() == (ROOT / "serving_mlops" / rel).read_text(), f"{rel} is out of date: run nbdev_export"


def test_java_check_passes_here():
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "ensure-java")], capture_output=True, text=True)
    assert proc.returncode == 0 and "Java" in proc.stdout


def test_java_check_stops_with_instructions_when_it_cannot_install(tmp_path):
    "Without java and without apt-get, `make` stops at once and says what to install."
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "awk", "id", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    proc = subprocess.run([str(bin_dir / "bash"), str(ROOT / ".ci" / "ensure-java")], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "needs Java 17 or newer" in proc.stderr and "openjdk-17-jre-headless" in proc.stderr
