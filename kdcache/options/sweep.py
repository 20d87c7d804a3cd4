"""The options of `kdcache sweep` that are its own (the study: its space, size, storage, pruner, final seeds), each
field declared once with its default and help; the options it passes to every trial are TrainingOptions'."""

from dataclasses import dataclass
from pathlib import Path

from kdcache.options.fields import DEFAULT_STUDY, option


@dataclass
class SweepOptions:
    """The study of `kdcache sweep` (`kdcache.sweep` takes the same names as keywords). `trials` and `output`
    have no default: the command line requires them."""

    space: list[str] | None = option(
        None,
        "A train-student option to sweep and its distribution, SPEC one of loguniform(a,b), uniform(a,b), int(a,b), "
        "choice(x,y,...); repeat it, e.g. --param 'learning_rate=loguniform(1e-4,1e-2)' --param "
        "'temperature=choice(2,5)'.",
        flags=("--param",),
        metavar="NAME=SPEC",
        type=list[str],
        parse=lambda params: list(params or []),
    )
    space_file: Path | None = option(
        None,
        "The same as a YAML or JSON file: option names to SPEC strings (a list of values is a choice).",
        flags=("--space",),
    )
    trials: int = option(..., "Trials in the whole study: a rerun of the same command continues up to N.")
    output: Path = option(
        ..., "Folder of the sweep: trials/NNNN (one student each), best/, plots/, sweep.json, study.db."
    )
    timeout: float | None = option(None, "Seconds after which this process starts no new trial.", show_default="none")
    storage: str | None = option(
        None,
        "Where the study lives: an SQLAlchemy URL (sqlite:///..., postgresql://...) that several processes or "
        "machines share, or the path of an Optuna journal file.",
        show_default="OUTPUT/study.db (SQLite)",
    )
    study_name: str = option(DEFAULT_STUDY, "The study's name in the storage.")
    pruner: str = option("median", "Stops hopeless trials after an epoch: median, hyperband or none.")
    final_seeds: int = option(
        0,
        "Once the study is complete, retrain the best options with seeds 0..K-1 (OUTPUT/final) and report "
        "validation mean ± sd.",
    )
    sampler_seed: int | None = option(None, "Seed of Optuna's TPE sampler.", show_default="random")
