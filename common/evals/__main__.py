"""``python -m common.evals``: the evaluation command line (see ``common.evals.evaluate``)."""

from common.evals.evaluate import main

main()
