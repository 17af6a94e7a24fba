"""``python -m sessionstore ...``: the same as the ``sessionstore`` command."""

from .cli import main

raise SystemExit(main())
