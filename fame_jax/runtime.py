"""Process set-up for the entry points: logging and the XLA compilation cache."""

import logging as py_logging
import os

import jax

from absl import logging


class _OwnInfoOnly(py_logging.Filter):
  """Passes records from fame_jax and the entry points, and any library warning."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = record.pathname.replace("\\", "/")
    return "/fame_jax/" in path or path.endswith(("/train.py", "/eval.py"))


def setup_logging() -> None:
  """Our INFO lines, and only warnings from libraries (Orbax logs every file it writes)."""
  logging.set_verbosity(logging.INFO)
  py_logging.getLogger().addFilter(_OwnInfoOnly())
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def enable_compilation_cache() -> None:
  """Keeps compiled XLA programs on disk, so a resumed or repeated run starts at once.

  The directory is $FAME_JAX_CACHE_DIR, default ~/.cache/fame_jax/xla; set it to
  an empty string to turn the cache off.
  """
  path = os.environ.get("FAME_JAX_CACHE_DIR", os.path.expanduser("~/.cache/fame_jax/xla"))
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
