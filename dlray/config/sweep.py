"""The `tune:` section: a job file plus a search space is a sweep (see dlray/tune.py). Names follow ray.tune."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dlray.config.sections import Section

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class SearchParam(Section):
    """One dotted config key's search space, e.g. `optim.lr: {loguniform: [1.0e-4, 1.0e-1]}`.

    `when` makes it conditional: `optim.momentum: {uniform: [0.8, 0.99], when: {optim.name: sgd}}`
    is sampled and applied only in trials whose optim.name is sgd (a list there means any of them).
    """

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # low inclusive, high exclusive, as ray.tune.randint
    choice: list[Any] | None = None
    grid: list[Any] | None = None  # every value, each in num_samples trials (ray.tune.grid_search)
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_distribution(self):
        given = [d for d in DISTRIBUTIONS if getattr(self, d) is not None]
        if len(given) != 1:
            raise ValueError(f"a search-space entry needs exactly one of {', '.join(DISTRIBUTIONS)}, got {given or 'none'}")
        name, args = self.distribution
        if name in ("uniform", "loguniform", "randint") and not args[0] < args[1]:
            raise ValueError(f"{name}: low must be below high, got {list(args)}")
        if name == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform: low must be positive, got {args[0]}")
        if name in ("choice", "grid") and not args:
            raise ValueError(f"{name}: needs at least one value")
        return self

    @property
    def distribution(self) -> tuple[str, Any]:
        return next((d, getattr(self, d)) for d in DISTRIBUTIONS if getattr(self, d) is not None)

    def extremes(self) -> list[Any]:
        """Values that, if valid, make every sampled value valid: the ends of a range, or every choice."""
        name, args = self.distribution
        return [args[0], args[1] - 1] if name == "randint" else list(args)

    def active(self, trial: dict[str, Any]) -> bool:
        if not self.when:
            return True
        return all(trial.get(key) in (wanted if isinstance(wanted, list) else [wanted]) for key, wanted in self.when.items())


class SweepSchedulerConfig(Section):
    """Ray Tune's trial scheduler; it sees every validation (one Tune iteration = one validation: an epoch's
    end, or every train.val_every_n_steps steps)."""

    name: Literal["fifo", "asha", "hyperband", "median", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1)  # asha, median: validations a trial always gets
    # asha, hyperband: the validations a trial runs at most (Tune's name). Default: train.num_epochs, or
    # max_steps / val_every_n_steps under a step budget validated by steps; other budgets must say.
    max_t: int | None = Field(None, ge=1)
    reduction_factor: float = Field(2, gt=1)  # asha, hyperband: 1/this of trials go on at each rung
    min_samples_required: int = Field(3, ge=1)  # median: trials to compare with before stopping one
    perturbation_interval: int = Field(1, ge=1)  # pbt: validations between exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # pbt: bottom fraction that copies the top
    resample_probability: float = Field(0.25, ge=0, le=1)  # pbt: explore by resampling, else by x0.8/x1.2
    # pbt: wait at each perturbation interval until every trial reaches it (pausing those ahead), then
    # exploit over all their scores; asynchronous PBT compares only the trials that happen to have reported.
    synch: bool = False


class SearchAlgConfig(Section):
    name: Literal["random", "grid", "optuna"] = "random"  # grid: every choice becomes a grid axis
    seed: int | None = 0  # same seed, same trial configs


class TuneSection(Section):
    """Mirrors ray.tune.TuneConfig; the metric and mode are the job's train.metric / train.mode."""

    num_samples: int = Field(4, ge=1)  # trials (per grid point)
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: as many trials as the cluster fits at once
    scheduler: SweepSchedulerConfig = SweepSchedulerConfig()
    search_alg: SearchAlgConfig = SearchAlgConfig()
    search_space: dict[str, SearchParam] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _space_fits_search(self):
        if not self.search_space:
            raise ValueError("tune.search_space is empty: name at least one dotted config key to search")
        kinds = {path: p.distribution[0] for path, p in self.search_space.items()}
        for path, param in self.search_space.items():
            for key, wanted in (param.when or {}).items():
                if key not in self.search_space or kinds[key] not in ("choice", "grid"):
                    raise ValueError(f"tune.search_space.{path}.when: {key!r} must be a choice or grid entry of tune.search_space")
                values = self.search_space[key].distribution[1]
                if any(w not in values for w in (wanted if isinstance(wanted, list) else [wanted])):
                    raise ValueError(f"tune.search_space.{path}.when: {key} is never {wanted!r} (its values: {values})")
        search, scheduler = self.search_alg.name, self.scheduler.name
        continuous = [path for path, kind in kinds.items() if kind not in ("choice", "grid")]
        if search == "grid" and continuous:
            raise ValueError(f"tune.search_alg.name 'grid' needs choice or grid entries; {', '.join(continuous)} use a range (use search_alg 'random')")
        if search == "optuna" and "grid" in kinds.values():
            raise ValueError("tune.search_alg.name 'optuna' samples its own points: use choice instead of grid")
        if scheduler == "pbt" and search != "random":
            raise ValueError(f"tune.scheduler.name 'pbt' explores by itself: it needs tune.search_alg.name 'random', got {search!r}")
        if scheduler == "pbt" and any(p.when for p in self.search_space.values()):
            raise ValueError("tune.scheduler.name 'pbt' cannot keep `when` conditions while it mutates hyperparameters; drop them")
        return self
