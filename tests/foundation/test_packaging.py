"""A plain (non-editable) install ships every package and the JSON tables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rpa", "moe", "quant", "reference", "autotune", "tuned_configs", "bench", "engine")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (whl,) = out.glob("pallaskit-*.whl")
    return whl


def test_wheel_contains_packages_and_tables(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names, pkg
    tables = [n for n in names if n.startswith("tuned_configs/") and n.endswith(".json")]
    shipped = list((ROOT / "tuned_configs").glob("*/*.json"))
    assert shipped, "the repository ships no tables"
    assert len(tables) == len(shipped)


def test_plain_install_imports_everything(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import " + ", ".join(PACKAGES) + "; import tuned_configs as t; "
            f"assert str(t.ROOT).startswith({str(target)!r}), t.ROOT; "
            "assert list(t.ROOT.glob('*/*.json')); print('ok')")
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
