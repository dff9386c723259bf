"""The error tree of sft-job: each class carries the process exit code that `cli.main` uses.

| code | meaning                                                          | retry? |
|------|------------------------------------------------------------------|--------|
| 0    | done, or already done (`_SUCCESS` present)                        | no     |
| 1    | unexpected error (a bug): the traceback is printed               | limited|
| 2    | bad spec, bad data, unsupported combination                      | no     |
| 3    | credentials, permission or missing bucket/object on storage/Hub  | no     |
| 75   | transient: storage unavailable after retries, or preempted after a committed checkpoint | yes |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_SPEC = 2
EXIT_ACCESS = 3
EXIT_RETRY = 75  # EX_TEMPFAIL from sysexits.h


class SftJobError(Exception):
    """Base class: an error whose message is meant for the user, on one line."""

    exit_code: int = EXIT_BUG


class SpecError(SftJobError):
    """The job spec is invalid (unknown key, wrong type, impossible combination)."""

    exit_code = EXIT_SPEC


class DataError(SftJobError):
    """The data cannot be used as asked (malformed rows, wrong format, nothing left)."""

    exit_code = EXIT_SPEC


class ModelError(SftJobError):
    """The base model or tokenizer cannot be used (missing weights, no EOS token...)."""

    exit_code = EXIT_SPEC


class UnsupportedError(SftJobError):
    """The combination asked for cannot run on this hardware or software."""

    exit_code = EXIT_SPEC


class NoRunError(SftJobError):
    """`sft-job status`: nothing of a run at the location given."""

    exit_code = EXIT_SPEC


class AccessError(SftJobError):
    """Storage or Hub access failed for good: no credentials, denied, missing bucket/object."""

    exit_code = EXIT_ACCESS


class TransientError(SftJobError):
    """A failure worth retrying the whole job for (storage unavailable after retries)."""

    exit_code = EXIT_RETRY


class Preempted(SftJobError):
    """The job was asked to stop (SIGTERM/SIGINT) and committed a checkpoint first."""

    exit_code = EXIT_RETRY


class TrainingDiverged(SftJobError):
    """The loss, a gradient norm or the weights became NaN or infinite: the same spec would do
    it again, so retrying cannot help (nothing is published; committed checkpoints stay)."""

    exit_code = EXIT_SPEC


class OutputInUse(SftJobError):
    """output.uri is leased by another live run (or this run lost its lease to one)."""

    exit_code = EXIT_SPEC
