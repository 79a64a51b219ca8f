"""Evaluation: benchmark tasks (built-in and standard local files), their scorers, a code
sandbox, intrinsic loss/bpb, and `run_eval` which ties them together for `spud eval`."""

from spud.eval.runner import run_eval

__all__ = ["run_eval"]
