"""``python -m zsad_cli``: the ``zsad`` command."""

from zsad_cli import main

raise SystemExit(main())
