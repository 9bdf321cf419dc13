"""``python -m pipeline.cli``: what ``t2i`` runs (the job submission entrypoint uses it)."""
from pipeline.cli import main

main()
