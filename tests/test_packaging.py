"""A non-editable install gets every module and every config (conf/ ships as framework/conf)."""

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_holds_all_code_and_configs(tmp_path):
    import shutil

    source = tmp_path / "src"  # a copy: setuptools builds in place, and stale build/ files must not count
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "mlruns", "build", "*.egg-info", "__pycache__", ".whl"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheel").glob("layerprobe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("framework", "plugins"):
        for module in (REPO / package).rglob("*.py"):
            assert module.relative_to(REPO).as_posix() in names, module
    for config in (REPO / "conf").rglob("*.yaml"):
        assert "framework/conf/" + config.relative_to(REPO / "conf").as_posix() in names, config
