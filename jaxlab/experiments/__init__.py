"""The experiment runner and report: a method's experiment as a declaration of stages, claims and plots.

    from jaxlab.experiments import Experiment, Report, TrainStage, TransformStage

    exp = Experiment(config, workdir, section="pela")          # keys under config.pela; base = the rest
    dense = exp.run(TrainStage("dense", {"seed": 0}))           # trains derive(base, seed=0) in <workdir>/dense
    svd = exp.run(TransformStage("svd", "lowrank_svd", [exp.path("dense")], {"ratio": 2.0}))
    rep = Report(exp, "PELA on digits")
    rep.rows.append({"name": "dense", "seed": 0, "test_acc": dense["test_accuracy"]})
    rep.table(...); p = rep.precondition(...); rep.claim(..., requires=[p]); rep.figure("pela.png", draw)
    rep.write()                                                  # results.json, results.md, figures

See `runner` (stages, `derive`, the done-marker) and `report` (rows, `aggregate`, baselines, preconditions,
claims, the Command/Machine lines), and docs/adding_a_method.md.
"""

from jaxlab.experiments.report import (
    STD_NOTE,
    VERDICTS,
    Report,
    aggregate,
    bars,
    check_rows,
    claim,
    command,
    compare,
    errorbars,
    figure,
    learned,
    lookup,
    machine,
    majority_baseline,
    markdown_table,
    matches,
    pm,
    precondition,
    split_labels,
    stats,
    summary_row,
)
from jaxlab.experiments.runner import (
    DONE_FILE,
    REQUEST_FILE,
    Experiment,
    TrainStage,
    TransformStage,
    derive,
    dotted,
    jsonable,
)

__all__ = [
    "DONE_FILE", "REQUEST_FILE", "STD_NOTE", "VERDICTS", "Experiment", "Report", "TrainStage", "TransformStage",
    "aggregate", "bars", "check_rows", "claim", "command", "compare", "derive", "dotted", "errorbars", "figure",
    "jsonable", "learned", "lookup", "machine", "majority_baseline", "markdown_table", "matches", "pm", "precondition",
    "split_labels", "stats", "summary_row",
]
