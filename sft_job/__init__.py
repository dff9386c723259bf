"""sft-job: supervised fine-tuning as a containerized batch job."""

__version__ = "0.1.0"
