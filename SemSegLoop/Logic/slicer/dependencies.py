"""What SemSegLoop needs in Slicer's Python, what is missing or incompatible there, and the pip
arguments that install the rest without ever replacing Slicer's own numpy, SimpleITK or torch.

Why a constraints file and not ``--no-deps``: MONAI only depends on numpy and torch, which are
already there when we install it (torch comes first, through SlicerPyTorch), so a constraints file
that pins every Slicer-owned package to its installed version lets pip resolve normally and makes
it *fail with a message* instead of silently upgrading numpy/SimpleITK/torch. ``--no-deps`` would
hide a genuinely missing dependency until import time, inside the training thread.

Pure Python (no slicer, no Qt): the module calls these functions on the main thread, tests call
them directly.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from semsegloop.errors import TrainingError

MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Requirement:
    """One package: its PyPI name, version specifier, import name, and who installs it.

    installer: "pytorch" (SlicerPyTorch's PyTorchUtils picks the CUDA/CPU build), "pip", or
    "slicer" (ships with Slicer; never installed or upgraded by us).
    """
    name: str
    specifier: str
    import_name: str
    installer: str = "pip"

    def __str__(self) -> str:
        return f"{self.name}{self.specifier}"


# torch first: everything after it must find torch already satisfied, or pip would pull a
# multi-GB default build from PyPI instead of the one PyTorchUtils chose (TotalSegmentator PR #65).
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", ">=2.1", "torch", installer="pytorch"),
    Requirement("monai", ">=1.4", "monai"),
    Requirement("safetensors", ">=0.4", "safetensors"),
    Requirement("pynrrd", ">=1.0", "nrrd"),
    Requirement("tifffile", ">=2023.1", "tifffile"),
    Requirement("tqdm", ">=4.60", "tqdm"),
    Requirement("scikit-learn", ">=1.6", "sklearn"),
)

# Bundled with Slicer 5.10+ (numpy 2.0, scipy 1.13, Pillow 11, SimpleITK). Reinstalling any of
# them from PyPI is the most reported way AI extensions break Slicer (Slicer#6711, #7661).
SLICER_OWNED: tuple[Requirement, ...] = (
    Requirement("numpy", ">=1.26", "numpy", installer="slicer"),
    Requirement("SimpleITK", ">=2.3", "SimpleITK", installer="slicer"),
    Requirement("scipy", ">=1.10", "scipy", installer="slicer"),
)

# Never upgraded or reinstalled by our pip calls: pinned in the constraints file when installed.
PROTECTED = ("numpy", "SimpleITK", "scipy", "pillow", "torch")


@dataclass(frozen=True)
class RequirementStatus:
    """state: "ok", "missing" (pip or PyTorchUtils can install it), "outdated" (pip can upgrade
    it; a restart is needed if it was already imported) or "incompatible" (we must not fix it
    with pip; message says what the person should do)."""
    requirement: Requirement
    installed: str | None
    state: str
    message: str


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (case and -/_ insensitive), None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    wanted = canonical_name(name)
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata.get("Name") or ""
        if canonical_name(dist_name) == wanted:
            return dist.version
    return None


# ---------------------------------------------------------------------------------------------
# Version comparison: packaging when importable (Slicer ships it), else a small PEP 440 subset
# that covers the versions we meet ("2.13.0+cpu", "1.6.1", "2.0.0rc1", "2024.1.2", "0.4.dev3").

_SPEC_RE = re.compile(r"^\s*(===|==|!=|<=|>=|~=|<|>)\s*([^\s,;]+)\s*$")
_VERSION_RE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)(?:[-_.]?(a|b|c|rc|alpha|beta|pre|preview)[-_.]?(\d*))?"
                         r"(?:[-_.]?(post|rev|r)[-_.]?(\d*))?(?:[-_.]?(dev)[-_.]?(\d*))?(?:\+(.*))?\s*$",
                         re.IGNORECASE)


def _version_key(version: str) -> tuple:
    """Sortable key: release, then dev < pre < final < post. Raises ValueError if unparseable."""
    m = _VERSION_RE.match(version)
    if not m:
        raise ValueError(f"cannot parse version {version!r}")
    release = [int(p) for p in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    pre_tag, pre_num, post_tag, post_num, dev_tag, dev_num = m.group(2, 3, 4, 5, 6, 7)
    if pre_tag:
        pre = ({"alpha": "a", "beta": "b", "c": "rc", "pre": "rc", "preview": "rc"}
               .get(pre_tag.lower(), pre_tag.lower()), int(pre_num or 0))
        pre_rank = {"a": 0, "b": 1, "rc": 2}[pre[0]]
        pre_key = (pre_rank, pre[1])
    elif dev_tag and not post_tag:
        pre_key = (-1, 0)           # 1.0.dev1 sorts before 1.0a1
    else:
        pre_key = (3, 0)            # final release
    post_key = int(post_num or 0) + 1 if post_tag else 0
    dev_key = int(dev_num or 0) if dev_tag else float("inf")
    return (tuple(release), pre_key, post_key, dev_key)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in _VERSION_RE.match(version).group(1).split("."))


def _fallback_satisfies(version: str, specifier: str) -> bool:
    key = _version_key(version)
    local_free = version.split("+", 1)[0]
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        m = _SPEC_RE.match(clause)
        if not m:
            raise ValueError(f"cannot parse version specifier {clause!r}")
        op, target = m.groups()
        if op == "===":
            ok = version == target
        elif op in ("==", "!=") and target.endswith(".*"):
            prefix = tuple(int(p) for p in target[:-2].split("."))
            ok = _release(version)[:len(prefix)] == prefix
            ok = ok if op == "==" else not ok
        elif op in ("==", "!="):
            # A local label ("+cpu") only matters if the specifier names one.
            same = (_version_key(version if "+" in target else local_free) == _version_key(target)
                    and ("+" not in target or version.split("+", 1)[1:] == target.split("+", 1)[1:]))
            ok = same if op == "==" else not same
        elif op == "~=":
            parts = target.split(".")
            if len(parts) < 2:
                raise ValueError(f"'~=' needs at least two version parts: {clause!r}")
            prefix = tuple(int(p) for p in parts[:-1])
            ok = key >= _version_key(target) and _release(version)[:len(prefix)] == prefix
        else:
            tkey = _version_key(target)
            ok = {"<": key < tkey, "<=": key <= tkey, ">": key > tkey, ">=": key >= tkey}[op]
        if not ok:
            return False
    return True


def version_satisfies(version: str, specifier: str) -> bool:
    """True if ``version`` meets ``specifier`` (e.g. ">=1.4,<2"). Empty specifier: always True."""
    if not specifier.strip():
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:
        return _fallback_satisfies(version, specifier)
    # prereleases=True: a preview torch the person installed on purpose is not "incompatible".
    return SpecifierSet(specifier).contains(Version(version), prereleases=True)


# ---------------------------------------------------------------------------------------------

def check_requirements(requirements=REQUIREMENTS + SLICER_OWNED) -> list[RequirementStatus]:
    """Status of each requirement, in install order, with a message naming package and version."""
    statuses = []
    for req in requirements:
        have = installed_version(req.name)
        if have is None:
            if req.installer == "slicer":
                state, msg = "incompatible", (
                    f"{req.name} is missing from Slicer's Python, but it ships with Slicer 5.10 "
                    f"and later. Install a recent Slicer (5.10+); SemSegLoop will not install "
                    f"{req.name} itself because that would replace Slicer's own copy.")
            elif req.installer == "pytorch":
                state, msg = "missing", (f"{req} is not installed; it will be installed with the "
                                         f"PyTorch Utils module (right CUDA/CPU build).")
            else:
                state, msg = "missing", f"{req} is not installed."
        else:
            try:
                ok = version_satisfies(have, req.specifier)
            except ValueError:
                ok = True   # an exotic version string is not a reason to refuse to run
            if ok:
                state, msg = "ok", f"{req.name} {have} is installed."
            elif req.installer == "slicer":
                state, msg = "incompatible", (
                    f"{req.name} {have} is installed, but SemSegLoop needs {req}. This is Slicer's "
                    f"own copy: use Slicer 5.10 or later instead of upgrading it with pip.")
            elif req.installer == "pytorch":
                state, msg = "incompatible", (
                    f"torch {have} is installed, but SemSegLoop needs {req}. Open the PyTorch Utils "
                    f"module, uninstall torch, restart Slicer, then press Train again to install "
                    f"a compatible version.")
            else:
                state, msg = "outdated", (f"{req.name} {have} is installed, but SemSegLoop needs "
                                          f"{req}; it will be upgraded (restart Slicer afterwards "
                                          f"if it was already in use).")
        statuses.append(RequirementStatus(req, have, state, msg))
    return statuses


def missing_requirements(requirements=REQUIREMENTS) -> list[Requirement]:
    """Requirements that need installing (absent or upgradable), torch first if it is among them.

    Slicer-owned packages and an installed but too old torch are never returned: they are
    reported by :func:`incompatible_requirements`, not fixed with pip.
    """
    return [s.requirement for s in check_requirements(requirements)
            if s.state in ("missing", "outdated")]


def incompatible_requirements(requirements=REQUIREMENTS + SLICER_OWNED) -> list[RequirementStatus]:
    statuses = [s for s in check_requirements(requirements) if s.state == "incompatible"]
    if sys.version_info[:2] < MIN_PYTHON:
        py = ".".join(map(str, sys.version_info[:3]))
        statuses.insert(0, RequirementStatus(
            Requirement("python", ">=" + ".".join(map(str, MIN_PYTHON)), "sys", "slicer"), py,
            "incompatible", f"Python {py} is too old for SemSegLoop (needs 3.10+): use Slicer "
                            f"5.10 or later."))
    return statuses


def ensure_compatible(requirements=REQUIREMENTS + SLICER_OWNED) -> None:
    """Raise TrainingError listing every incompatible package, with what to do about each."""
    bad = incompatible_requirements(requirements)
    if bad:
        raise TrainingError("SemSegLoop cannot run with the installed packages:\n"
                            + "\n".join("- " + s.message for s in bad))


def constraints_text(protected=PROTECTED) -> str:
    """pip constraints pinning each installed protected package to its installed version."""
    lines = []
    for name in protected:
        have = installed_version(name)
        if have is not None:
            lines.append(f"{name}=={have}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_constraints(path: str | Path, protected=PROTECTED) -> Path:
    """Write :func:`constraints_text` to ``path`` (a temporary file the installer passes to pip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(constraints_text(protected), encoding="utf-8")
    return path


def pip_args_for(req, constraints_file: str | Path) -> list[str]:
    """Arguments after ``pip install`` for one requirement (or a list of them), pinned by
    ``constraints_file``.

    No ``--upgrade`` (it would upgrade satisfied dependencies too) and a constraints file so
    that pip refuses, with a resolver error, any plan that changes numpy/SimpleITK/scipy/torch.
    """
    reqs = list(req) if isinstance(req, (list, tuple)) else [req]
    specs = []
    for r in reqs:
        if isinstance(r, Requirement):
            if r.installer != "pip":
                raise ValueError(f"{r.name} is not installed with pip (installer: {r.installer})")
            specs.append(str(r))
            continue
        spec = str(r).strip()
        name = re.split(r"[<>=!~\[;\s]", spec, maxsplit=1)[0]
        if canonical_name(name) in {canonical_name(p) for p in PROTECTED}:
            raise ValueError(f"{name} belongs to Slicer or SlicerPyTorch and is never installed "
                             f"with pip by SemSegLoop")
        specs.append(spec)
    return specs + ["-c", str(constraints_file)]


def requirements_file_lines(requirements=REQUIREMENTS) -> list[str]:
    """The lines of Resources/requirements.txt (pip-installed packages only; torch comes from
    PyTorchUtils)."""
    return [str(r) for r in requirements if r.installer == "pip"]
