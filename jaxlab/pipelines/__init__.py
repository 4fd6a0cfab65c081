"""Method pipelines: each method's multi-stage experiment, a declaration on the runner of `jaxlab.experiments`.

A pipeline is `fn(config, workdir) -> dict` registered with `@register(name)` and selected by
`config.job = 'pipeline'`, `config.pipeline = name`. It builds an `experiments.Experiment` over its config (keys
under `config.<name>`), runs `TrainStage`s and `TransformStage`s (done stages are skipped, so re-running the same
command resumes the experiment) and writes its results through `experiments.Report`. docs/adding_a_method.md.
"""

from jaxlab.registry import Registry

PIPELINES = Registry("pipeline", key="config.pipeline", package="jaxlab.pipelines")
register, get, names = PIPELINES.register, PIPELINES.get, PIPELINES.names
