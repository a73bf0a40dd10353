"""Allow ``python -m provenanced``."""

from provenanced.cli import main

raise SystemExit(main())
