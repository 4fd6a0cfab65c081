"""JAX's persistent compilation cache for a job: `config.compilation_cache`.

Runs of one experiment (seeds, stages of a pipeline, a resumed run) compile the
same programs; on a CPU the cache turns most of those compilations into reads.

    ''      off
    'auto'  keep a cache that is already configured (the environment variable
            JAX_COMPILATION_CACHE_DIR or `jax.config`), else `<workdir>/jax_cache`
    <dir>   that directory
"""

from __future__ import annotations

import contextlib
import os

import jax


def resolve(setting, workdir: str) -> str:
  """The cache directory `setting` asks for ('' = none, or the one already configured)."""
  if setting is True:
    setting = "auto"
  if not setting or str(setting).lower() in ("off", "none", "false"):
    return ""
  if setting == "auto":
    return jax.config.jax_compilation_cache_dir or os.path.join(os.path.abspath(workdir), "jax_cache")
  return os.path.abspath(os.path.expanduser(str(setting)))


@contextlib.contextmanager
def enabled(setting, workdir: str):
  """Within the block, compiled programs are read from and written to the cache `setting` names.

  Yields the directory ('' when off). The previous settings come back on exit, so a library
  caller (a notebook, a test) keeps its own cache configuration.
  """
  path = resolve(setting, workdir)
  if not path or path == jax.config.jax_compilation_cache_dir:
    yield path
    return
  from jax.experimental.compilation_cache import compilation_cache as cc
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (path, 0.0, 0)):
    jax.config.update(k, v)
  cc.reset_cache()
  try:
    yield path
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    cc.reset_cache()
