"""`python -m semsegloop ...` runs the `semsegloop` command (the same as the console script),
so the engine service can be started with any Python that has the engine, e.g. PythonSlicer."""

from semsegloop.apps.cli import main

raise SystemExit(main())
