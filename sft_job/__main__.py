"""`python -m sft_job` runs the CLI."""

from sft_job.cli import main

main()
