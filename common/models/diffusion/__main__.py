"""``python -m common.models.diffusion train|sample ...``."""

from common.models.diffusion.cli import main

main()
