"""``python -m cnnpress`` is the ``cnnpress`` command."""

from cnnpress.cli.main import main

raise SystemExit(main())
