"""Job configuration: one YAML file per job, typed and checked before any Ray process starts.

    dlray validate jobs/cnn_digits.yaml strategy.name=deepspeed strategy.zero_stage=3

Section and key names follow what users already know: Ray's ScalingConfig/RunConfig
(`num_workers`, `use_gpu`, `storage_path`, `max_failures`) and Axolotl / LLaMA-Factory
(`micro_batch_size`, `gradient_accumulation_steps`, `max_grad_norm`, `warmup_steps`,
`early_stopping_patience`). Errors name the dotted key, the bad value and what is allowed.

    sections.py  the job's sections (model, finetune, data, train, optim, scheduler, strategy, scaling, run)
    serve.py     the `serve:` section: Serve's deployment options and each endpoint's settings
    sweep.py     the `tune:` section (search space, trial scheduler, search algorithm)
    trackers.py  the `tracking:` section (MLflow, Weights & Biases: configures dlray.trackers)
    job.py       JobConfig: all sections, and the checks across them
    dotted.py    dotted keys: set_dotted, validation errors worded by key, ConfigError
    loading.py   load_config: YAML + dotted overrides -> JobConfig
"""

from dlray.config.dotted import ConfigError, set_dotted
from dlray.config.job import JobConfig
from dlray.config.loading import apply_override, config_from_dict, job_files, load_config
from dlray.config.sections import (
    DataConfig,
    DataSection,
    DDPConfig,
    DeepSpeedConfig,
    FinetuneConfig,
    FSDPConfig,
    ModelConfig,
    OptimConfig,
    RunSection,
    ScalingSection,
    SchedulerConfig,
    Section,
    StrategyConfig,
    TrainConfig,
    data_config,
    families_where,
)
from dlray.config.serve import AutoscalingSection, ServeSection
from dlray.config.sweep import DISTRIBUTIONS, SearchAlgConfig, SearchParam, SweepSchedulerConfig, TuneSection
from dlray.config.trackers import MLflowSection, TrackingSection, WandbSection

__all__ = [
    "DISTRIBUTIONS", "AutoscalingSection", "ConfigError", "DataConfig", "DataSection", "DDPConfig", "DeepSpeedConfig", "FSDPConfig", "FinetuneConfig",
    "JobConfig", "MLflowSection", "ModelConfig", "OptimConfig", "RunSection", "ScalingSection", "SchedulerConfig", "SearchAlgConfig", "SearchParam",
    "Section", "ServeSection", "StrategyConfig", "SweepSchedulerConfig", "TrackingSection", "TrainConfig", "TuneSection", "WandbSection", "apply_override",
    "config_from_dict", "data_config", "families_where", "job_files", "load_config", "set_dotted",
]
