"""From the repository root, `import kernels` is the installed package (transformers imports it), not our folder;
our kernels are `adapruner.kernels` only, in the source tree and in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_at_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_transformers_imports_its_kernels_package_from_the_root():
    done = run_at_root("-c", "import transformers.activations, kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr
    assert not Path(done.stdout.strip()).is_relative_to(ROOT / "kernels")


@pytest.mark.parametrize("module, usage", [("adapruner", "usage: adapruner"), ("bench.speed", "usage: ")])
def test_python_dash_m_runs_from_the_root(module: str, usage: str):
    done = run_at_root("-m", module, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage)


def test_adapruner_kernels_is_the_top_level_folder():
    done = run_at_root("-c", "import adapruner.kernels.gather as g; print(g.__file__)")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == ROOT / "kernels" / "gather.py"


def test_the_wheel_holds_every_module(tmp_path: Path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("adapruner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "adapruner").rglob("*.py") if "kernels" not in p.parts}
    expected |= {f"adapruner/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert expected - names == set()
    assert not any(name.startswith("kernels/") for name in names)
