"""The package installs: a wheel built offline from pyproject.toml holds the
library alone (no tests, experiments or configs), and imports from anywhere."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built from a copy of the sources, so the build leaves nothing in the checkout."""
    import setuptools

    # From 70.1 setuptools builds wheels itself (no `wheel` package); requirements.txt asks for it.
    assert tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1), (
        f"setuptools {setuptools.__version__} is too old to build a wheel offline: pip install 'setuptools>=70.1'")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    for folder in ("anadp", "configs", "experiments", "tests"):  # the flat layout as it is
        shutil.copytree(os.path.join(ROOT, folder), source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "results", "fixtures"))
    out = tmp_path_factory.mktemp("wheel")
    # Offline: no index, no isolated build environment to fill.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("anadp-*.whl")
    return path


def test_wheel_holds_the_library_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "anadp/__init__.py" in names and "anadp/train.py" in names
    assert any(n.startswith("anadp/models/") for n in names)
    assert any(n.startswith("anadp/data/") for n in names)
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"anadp"}, tops
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: jax>=0.4.35" in metadata and "Requires-Dist: tensorboardX>=2.6.5" in metadata
    assert 'Requires-Dist: pytest>=8.0; extra == "test"' in metadata


def test_dependencies_match_requirements_txt(wheel):
    """pyproject.toml lists the runtime lines of requirements.txt, bound for bound."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    tests = set(project["optional-dependencies"]["test"])
    assert sorted(project["dependencies"]) == sorted(line for line in lines if line not in tests)
    assert tests <= set(lines)


def test_unpacked_wheel_imports_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", "import anadp, anadp.train, anadp.data; print(anadp.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(site / "anadp" / "__init__.py")
