"""The package as users get it: the wheel built from pyproject.toml,
installed in a fresh venv. Offline: the build uses the test venv's
hatchling (``--no-build-isolation``, hatchling is in the ``test`` extra),
the install takes no index, and the fresh venv borrows httpx and its
dependencies from the test venv's site-packages through a ``.pth`` file
(after its own site-packages, so that ``crownest`` comes from the wheel)."""

from __future__ import annotations

import email.parser
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import crownest

SDK = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.wheel


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("hatchling", reason="the offline build needs hatchling in the test venv (the test extra)")
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, SDK)
    wheels = list(dist.glob("crownest-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_carries_the_metadata_and_the_typing_marker(wheel: Path) -> None:
    assert wheel.name == f"crownest-{crownest.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"crownest-{crownest.__version__}.dist-info"
        metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
    assert "crownest/py.typed" in names
    assert {"crownest/_sync.py", "crownest/_async.py", "crownest/_types.py", "crownest/types.py"} <= names
    assert f"{dist_info}/licenses/LICENSE" in names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    assert metadata["Name"] == "crownest"
    assert metadata["Version"] == crownest.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["Requires-Python"] == ">=3.11"
    assert "CrowNest developers" in (metadata["Author"] or "")
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    assert any(url.startswith("Homepage, ") for url in metadata.get_all("Project-URL"))
    assert any(req.startswith("httpx") for req in metadata.get_all("Requires-Dist"))


def test_the_wheel_installs_in_a_fresh_venv_and_imports(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # httpx and its dependencies, from the test venv (no index needed).
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    probe = (
        "import importlib.metadata, importlib.resources, pathlib, crownest\n"
        "print(crownest.__version__)\n"
        "print(importlib.metadata.version('crownest'))\n"
        "print(importlib.resources.files('crownest').joinpath('py.typed').is_file())\n"
        "print(pathlib.Path(crownest.__file__).resolve())\n"
        "print(crownest.CrowNest.__name__, crownest.AsyncCrowNest.__name__)\n"
    )
    version, dist_version, typed, location, names = _run(python, "-c", probe, cwd=tmp_path).strip().splitlines()
    assert version == dist_version == crownest.__version__
    assert typed == "True"
    assert Path(location).is_relative_to(site.resolve()), f"crownest was imported from {location}, not the wheel"
    assert names == "CrowNest AsyncCrowNest"


def test_the_version_has_one_source() -> None:
    text = (SDK / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and "\nversion =" not in text
    assert 'path = "src/crownest/_version.py"' in text
    from crownest import _shared, _version

    assert crownest.__version__ == _version.__version__ == _shared.__version__
    assert _shared.USER_AGENT == f"crownest-python/{_version.__version__}"
