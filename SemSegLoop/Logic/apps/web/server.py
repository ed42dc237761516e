"""Start the web app: check the optional extra, make the sample project if asked, bind 127.0.0.1
unless told otherwise, make the access token the page must present, print the URL, serve.

Version pins (pyproject ``[web]``): trame-slicer 2.0.0 requires slicer-layer-dm 2.0.0, which pins
slicer-core 5.11 (with 5.13 the app does not import), and brings vtk 9.6.0 and trame 4.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

from semsegloop.apps.web import panel
from semsegloop.errors import SemSegLoopError

# Headless rendering: VTK draws through EGL (Mesa llvmpipe without a GPU), no X display needed.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

SAMPLE_IMAGES = 4
SAMPLE_SIZE = 192


class WebSetupError(SemSegLoopError):
    """The web app cannot start (missing extra, port or host not usable); says what to do."""


def check_extra() -> None:
    missing = []
    for module in ("trame", "trame_slicer", "trame_vuetify"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        raise WebSetupError("the web app needs the optional extra: pip install 'semsegloop[web]' "
                            f"(missing: {', '.join(missing)})")


def make_sample_project(path: Path):
    """The built-in sample: synthetic histology-like RGB tiles (apps/demo.py), three classes."""
    from semsegloop.apps.demo import CLASSES, COLORS, synthetic_tile
    from semsegloop.project import Project

    path = Path(path)
    if (path / "project.json").exists():
        return
    if path.exists() and any(path.iterdir()):
        raise WebSetupError(f"--sample needs an empty or new folder; '{path}' holds other files")
    with Project.create(path, CLASSES, dims=2, colors=COLORS) as project:
        for i in range(SAMPLE_IMAGES):
            image, _ = synthetic_tile(SAMPLE_SIZE, seed=100 + i)
            project.add_image(image, name=f"tile_{i + 1}")


def main(project_dir: Path | None, port: int = 8080, host: str = "127.0.0.1",
         sample: bool = False, device: str = "auto") -> int:
    check_extra()
    if sample:
        project_dir = Path(project_dir or "semsegloop-sample")
        make_sample_project(project_dir)
    if project_dir is not None and not (Path(project_dir) / "project.json").exists() \
            and Path(project_dir).exists() and any(Path(project_dir).iterdir()):
        raise WebSetupError(f"'{project_dir}' is not a SemSegLoop project (no project.json)")
    if not 0 <= port <= 65535:
        raise WebSetupError(f"--port {port} is not a port number")
    run(project_dir, port=port, host=host, device=device)
    return 0


def run(project_dir: Path | None, port: int = 8080, host: str = "127.0.0.1",
        token: str | None = None, device: str = "auto") -> None:
    from trame.app import get_server

    from semsegloop.apps.web.app import WebApp
    from semsegloop.apps.web.engine import ServiceEngine

    token = token or os.environ.get("SEMSEGLOOP_WEB_TOKEN") or secrets.token_urlsafe(24)
    server = get_server("semsegloop_web", client_type="vue3")
    WebApp(server, project_dir, lambda d: ServiceEngine(d, device=device))
    # trame reads wslink's --authKeyFile from the command line; a 0600 file keeps the token out
    # of the process list. The page sends it as ?secret=...; without it the socket is refused.
    fd, key_file = tempfile.mkstemp(prefix="semsegloop-web-", suffix=".key")
    with os.fdopen(fd, "w") as f:
        f.write(token)
    argv, sys.argv = sys.argv, [sys.argv[0], "--authKeyFile", key_file]
    if not panel.is_loopback(host):
        print(f"SemSegLoop web: serving on {host}: anyone who can reach it and has the URL "
              "below can read and change this project", flush=True)
    print(f"SemSegLoop web: open {panel.page_url(host, port, token)}", flush=True)
    try:
        server.start(port=port, host=host, timeout=0, open_browser=False,
                     show_connection_info=False)
    finally:
        sys.argv = argv
        Path(key_file).unlink(missing_ok=True)
