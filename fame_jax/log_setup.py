"""Logging for the entry points: our INFO lines, only warnings from libraries."""

import logging as py_logging

from absl import logging


class _OwnInfoOnly(py_logging.Filter):
  """Passes records from fame_jax and the entry points, and any library warning."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = record.pathname.replace("\\", "/")
    return "/fame_jax/" in path or path.endswith(("/train.py", "/eval.py"))


def setup() -> None:
  logging.set_verbosity(logging.INFO)
  py_logging.getLogger().addFilter(_OwnInfoOnly())
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
