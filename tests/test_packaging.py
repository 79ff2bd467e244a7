"""The wheel: one ``nos_sym`` namespace with the grammar as package data, importable from
outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("nos_sym-*.whl")
    return path


def test_wheel_contains_grammar_and_mapped_subpackages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "nos_sym/grammar/nos.lark",
        "nos_sym/grammar/__init__.py",
        "nos_sym/controller/__init__.py",
        "nos_sym/evaluation/__init__.py",
        "nos_sym/tasks/rosenbrock.py",
        "nos_sym/primitives.py",
    ):
        assert required in names


def test_installed_package_imports_from_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    script = (
        "import nos_sym, nos_sym.grammar, nos_sym.controller, nos_sym.evaluation\n"
        "rule = nos_sym.parse('v g sqrt id keep ; m o1 id id div')\n"
        "assert rule.key == nos_sym.parse('m v id sqrt div').key\n"
        "print(nos_sym.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r})\n{script}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(target))
