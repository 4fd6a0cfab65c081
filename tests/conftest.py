"""Shared test helpers: tiny configs, a jax cache dir, subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A persistent XLA compilation cache shared by the test processes (and their subprocesses): the
# tiny models of many tests compile to the same programs, so most compilations become cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests run a few steps of many small programs, so XLA compile time dominates the suite: LLVM at -O0 compiles
# the CPU programs about twice as fast (same float semantics, slower kernels). Subprocesses and notebook kernels
# inherit it. JAXLAB_TEST_XLA_OPT=default keeps XLA's own optimization level.
TEST_XLA_FLAGS = "" if os.environ.get("JAXLAB_TEST_XLA_OPT") == "default" else "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()


def tiny_config(steps: int = 4, **over):
  """A tiny digits ViT config that trains in a second or two."""
  from jaxlab import configs
  c = configs.base()
  c.model = configs.vit_digits_model()
  c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 16, 2, 2, 32
  c.model.patch_size = 4
  c.model.drop_path = 0.1
  c.data.batch_size = 32
  c.total_steps = steps
  c.log_every = 2
  c.progress = False
  c.optimizer.warmup_steps = 1
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def run_python(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter (e.g. with fake devices); returns the process."""
  env = dict(os.environ, **(env_extra or {}))
  if env_extra and "XLA_FLAGS" in env_extra:  # keep the suite's flags (above) next to the caller's
    env["XLA_FLAGS"] = f"{env_extra['XLA_FLAGS']} {os.environ.get('XLA_FLAGS', '')}".strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=timeout)


def run_main(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxlab.main", *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=timeout)


@pytest.fixture
def tiny():
  return tiny_config
