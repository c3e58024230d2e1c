"""``python -m common.models.clip_style train ...``."""

from common.models.clip_style.cli import main

raise SystemExit(main())
