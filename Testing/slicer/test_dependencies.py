"""Tests for semsegloop.slicer.dependencies: what is missing or incompatible in a Python, and pip
arguments that can never replace Slicer's own numpy/SimpleITK/torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from semsegloop.slicer import dependencies as deps
from semsegloop.errors import TrainingError

REPO = Path(__file__).resolve().parents[2]


def _fake_distribution(site: Path, name: str, version: str) -> None:
    """A real (metadata-only) installed distribution, found by importlib.metadata on sys.path."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.fixture
def shadow_site(tmp_path, monkeypatch):
    """A site directory searched before the venv's, so its distributions win."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_everything_needed_is_installed_in_the_dev_venv():
    statuses = deps.check_requirements()
    assert [s.requirement.name for s in statuses][:2] == ["torch", "monai"], "torch must come first"
    assert all(s.state == "ok" for s in statuses), [s.message for s in statuses if s.state != "ok"]
    assert deps.missing_requirements() == []
    assert deps.incompatible_requirements() == []
    deps.ensure_compatible()


def test_absent_package_is_missing_and_named():
    req = deps.Requirement("semsegloop-surely-absent-pkg", ">=1.0", "semsegloop_absent")
    (status,) = deps.check_requirements([req])
    assert status.state == "missing" and status.installed is None
    assert "semsegloop-surely-absent-pkg>=1.0" in status.message
    assert deps.missing_requirements([req]) == [req]


def test_old_monai_is_outdated_and_will_be_upgraded(shadow_site):
    _fake_distribution(shadow_site, "monai", "0.9.1")
    (status,) = deps.check_requirements([r for r in deps.REQUIREMENTS if r.name == "monai"])
    assert status.installed == "0.9.1"
    assert status.state == "outdated"
    assert "monai 0.9.1" in status.message and "monai>=1.4" in status.message
    assert [r.name for r in deps.missing_requirements()] == ["monai"]


def test_old_torch_is_incompatible_with_a_message_not_a_pip_upgrade(shadow_site):
    _fake_distribution(shadow_site, "torch", "1.13.1")
    assert "torch" not in [r.name for r in deps.missing_requirements()]
    bad = deps.incompatible_requirements()
    assert [s.requirement.name for s in bad] == ["torch"]
    assert "PyTorch Utils" in bad[0].message and "torch 1.13.1" in bad[0].message
    with pytest.raises(TrainingError, match="torch 1.13.1 is installed"):
        deps.ensure_compatible()


def test_old_slicer_numpy_is_incompatible_and_never_installed(shadow_site):
    _fake_distribution(shadow_site, "numpy", "1.21.0")
    bad = deps.incompatible_requirements()
    assert [s.requirement.name for s in bad] == ["numpy"]
    assert "Slicer 5.10" in bad[0].message
    assert all(r.installer != "slicer" for r in deps.missing_requirements())


@pytest.mark.parametrize("version,spec,expected", [
    ("2.13.0+cpu", ">=2.1", True),
    ("2.0.0", ">=2.1", False),
    ("2.1", ">=2.1.0", True),
    ("2.1.0rc1", ">=2.1", False),
    ("2.1.0.post1", ">=2.1", True),
    ("2.2", ">2.1", True),
    ("1.6.1", ">=1.4,<2", True),
    ("2.0.0", ">=1.4,<2", False),
    ("2024.1.2", ">=2023.1", True),
    ("0.4.dev3", ">=0.4", False),
    ("1.26.4", "==1.26.*", True),
    ("1.27.0", "==1.26.*", False),
    ("2.13.0+cpu", "==2.13.0", True),
    ("2.13.0+cpu", "==2.13.0+cu121", False),
    ("1.4.2", "~=1.4", True),
    ("2.0", "~=1.4", False),
    ("1.0", "!=1.0", False),
])
def test_fallback_version_comparison_agrees_with_packaging(version, spec, expected):
    assert deps._fallback_satisfies(version, spec) is expected
    packaging = pytest.importorskip("packaging.specifiers")
    from packaging.version import Version
    assert packaging.SpecifierSet(spec).contains(Version(version), prereleases=True) is expected


def test_constraints_pin_installed_slicer_owned_packages(tmp_path):
    text = deps.constraints_text()
    import numpy
    import torch
    assert f"numpy=={numpy.__version__}" in text.splitlines()
    assert f"torch=={torch.__version__}" in text.splitlines()
    assert any(line.lower().startswith("simpleitk==") for line in text.splitlines())
    path = deps.write_constraints(tmp_path / "c.txt")
    assert path.read_text() == text


def test_pip_args_for_adds_constraints_and_refuses_protected(tmp_path):
    monai = next(r for r in deps.REQUIREMENTS if r.name == "monai")
    assert deps.pip_args_for(monai, tmp_path / "c.txt") == ["monai>=1.4", "-c", str(tmp_path / "c.txt")]
    assert "--upgrade" not in deps.pip_args_for("tqdm>=4.60", "c.txt")
    for protected in ("numpy>=2", "SimpleITK", "simpleitk<3", "torch==2.5", "scipy"):
        with pytest.raises(ValueError, match="never installed"):
            deps.pip_args_for(protected, "c.txt")
    rest = [r for r in deps.REQUIREMENTS if r.installer == "pip"]
    assert deps.pip_args_for(rest, "c.txt") == [str(r) for r in rest] + ["-c", "c.txt"]
    torch_req = deps.REQUIREMENTS[0]
    with pytest.raises(ValueError, match="PyTorchUtils|pytorch"):
        deps.pip_args_for(torch_req, "c.txt")


def test_requirements_txt_matches_the_pip_requirements():
    lines = [line.strip() for line in
             (REPO / "SemSegLoop" / "Resources" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == deps.requirements_file_lines()
    assert not any(line.split(">")[0].split("=")[0].lower() in ("torch", "numpy", "simpleitk")
                   for line in lines)


def _write_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal pure-Python wheel, enough for pip's resolver."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: %s\nVersion: %s\n%s" % (
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)))
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def test_pip_with_our_constraints_refuses_to_replace_slicer_numpy(tmp_path):
    """A package that wants numpy<2 next to a numpy 1.99 wheel: unconstrained pip would
    downgrade numpy; with our arguments it stops with a resolver error instead."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels, "numpy", "1.99.0", [])
    _write_wheel(wheels, "greedy_pkg", "1.0", ["numpy<2"])
    constraints = deps.write_constraints(tmp_path / "constraints.txt")
    base = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
            "--find-links", str(wheels), "--disable-pip-version-check"]

    free = subprocess.run(base + ["greedy_pkg"], capture_output=True, text=True, timeout=120)
    assert free.returncode == 0 and "numpy-1.99.0" in free.stdout, free.stdout + free.stderr

    pinned = subprocess.run(base + deps.pip_args_for("greedy_pkg", constraints),
                            capture_output=True, text=True, timeout=120)
    assert pinned.returncode != 0
    assert "numpy" in (pinned.stdout + pinned.stderr)
    assert "Would install" not in pinned.stdout
