"""jaxlab: weight-level research methods as pure JAX functions over parameter pytrees.

Modules: `train` (the one training loop), `trees`, `checkpoint`, `sharding`,
`data`, `models`, `objectives`, `parameterizations`, `transforms`, `pipelines`.
"""

__version__ = "0.1.0"
