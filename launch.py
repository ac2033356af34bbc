"""Train a language model with PEER, MoE or dense FFNs.

    python launch.py                                   # default experiment: small PEER LM, CPU, 1 process
    python launch.py model=moe trainer.max_steps=50    # any Hydra override
    python launch.py cluster.nproc_per_node=2 parallel.dp=2
    python launch.py cluster=slurm cluster.partition=gpu cluster.nproc_per_node=8 cluster.gpus_per_node=8 parallel.dp=8
    python launch.py -m optim.lr=1e-3,3e-3             # a sweep: one run per point, then a table of losses
    python launch.py experiment=isoflop isoflop.budget=2e13   # isoFLOP study: planned sweep + report
    python launch.py cluster.dry_run=true ...          # print what would run (sbatch script), start nothing
    python launch.py --cfg job      # the composed config; --help: config groups; docs: python -m orchestrator.config

The only place that sees Hydra's DictConfig. Each run (each point of a sweep) is composed once,
turned into a validated TrainConfig and handed to its launcher (cluster/launchers.py), which owns
dry run, preflight, start or submission and waiting. Bad input: one line, exit 2, nothing started.
"""

import copy
import importlib
import itertools
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from cluster.launchers import Job, LaunchRefused, SweepHooks, launcher_for
from orchestrator import preflight, sweep
from orchestrator.config import TrainConfig, load_config, to_dict, validate
from orchestrator.errors import USER_ERROR_EXIT_CODE, ConfigError, one_line_compose_error

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
INFO_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "-sc", "--version"}


def main(argv: list[str]) -> int:
    if any(a.split("=")[0] in INFO_FLAGS for a in argv):  # --cfg job, --help, ...: Hydra prints, nothing starts
        sys.argv[1:] = argv
        return hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(lambda cfg: None)() or 0
    jobs, sweep_dir, configs = check(argv)
    try:
        launcher = launcher_for(jobs)
        if any(job.cluster["dry_run"] for job in jobs):
            return launcher.dry_run(jobs) or 0
        for c in {(c.checkpoint.dir, c.data.source, c.tracking.uri): c for c in configs}.values():
            preflight.check_stores(c)  # every remote store and service reachable, before anything starts
        launcher.preflight(jobs)
        hooks = SweepHooks(**sweep.hooks(sweep_dir, configs[0])) if sweep_dir else SweepHooks()
        from orchestrator.train import train_main  # late: torch and DeepSpeed take seconds to import

        return launcher.launch(train_main, jobs, hooks)
    except (ConfigError, LaunchRefused) as exc:
        return refuse(exc)


def check(argv: list[str]) -> tuple[list[Job], str | None, list[TrainConfig]]:
    """compose_runs, or its one-line refusal and SystemExit(2) (also for tests and tools)."""
    try:
        return compose_runs(argv)
    except (ConfigError, LaunchRefused) as exc:
        sys.exit(refuse(exc))


def refuse(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE


def compose_runs(argv: list[str]) -> tuple[list[Job], str | None, list[TrainConfig]]:
    """Every run the command line stands for, each composed once and validated: one, the points of a
    sweep (-m, in Hydra's job order), and what the point generators make of each. One bad point
    refuses all. Returns (jobs, sweep dir or None, their configs)."""
    runs, sweep_dir, given = compose(argv)
    jobs, configs = [], []
    for num, (own, cfg) in enumerate(runs):
        try:
            if sweep_dir:
                _set_keys(cfg, sweep.point_values(sweep_dir, num, given, list(cfg.tracking.tags), own))
            configs.append(to_train_config(cfg))
        except ConfigError as exc:
            raise LaunchRefused((f"sweep point {num} ({' '.join(own)}): " if sweep_dir else "") + str(exc)) from None
        jobs.append(Job.of(to_dict(configs[-1]), num if sweep_dir else None, own))
    return jobs, sweep_dir, configs


def compose_train_config(overrides: list[str], check_fit: bool = True) -> TrainConfig:
    """One run's validated TrainConfig from launch.py's overrides, for tools that take the same command
    line (python -m orchestrator.plan, benchmarks); check_fit=False: also what the planner would refuse."""
    try:
        return compose_runs(list(overrides) + ([] if check_fit else ["plan.check=false"]))[2][0]
    except LaunchRefused as exc:
        raise ConfigError("overrides", " ".join(overrides), str(exc), "fix the overrides") from None


def compose(argv: list[str]) -> tuple[list[tuple[list[str], object]], str | None, set[str]]:
    """([(a run's own overrides, its DictConfig)], the sweep dir (None: not a sweep), the keys given)."""
    if unknown := next((a for a in argv if a.startswith("-") and a not in ("-m", "--multirun")), None):
        raise LaunchRefused(f"{unknown}: not an option of launch.py; fix: key=value overrides, -m, --cfg job, --help")
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = len(overrides) < len(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        points = sweep_points(parsed) if multirun else [overrides]
    except HydraException as exc:
        raise LaunchRefused(f"{' '.join(overrides)}: {str(exc).splitlines()[0]}; fix: " + (
            "sweep with a=1,2 or a=range(1,4)" if multirun else "write key=value (quote values with spaces)")) from None
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    runs, sweep_dir, is_sweep = [], None, multirun
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for num, point in enumerate(points):
            own = [o for o in point if o.split("=", 1)[0] in swept]
            try:
                cfg = hydra.compose(config_name="config", overrides=point, return_hydra_config=True)
                sweep_dir = sweep_dir or str(Path(cfg.hydra.sweep.dir).absolute())
                OmegaConf.set_struct(cfg, False), cfg.pop("hydra")  # compose's hydra node: only for its sweep dir
                # A point generator (sweep.POINT_GENERATORS, e.g. an isoFLOP study) may make several runs of it.
                generated = sweep.generate(OmegaConf.to_container(cfg, resolve=True), " ".join(point),
                                           validate_base=lambda: to_train_config(cfg))
            except (HydraException, OmegaConfBaseException, ConfigError) as exc:
                text = str(exc) if isinstance(exc, ConfigError) else one_line_compose_error(str(exc), point, CONF_DIR)
                raise LaunchRefused((f"sweep point {num} ({' '.join(point)}): " if multirun else "") + text) from None
            if generated is None:  # an ordinary run; its tags show every override but Hydra's own
                runs.append((own or [o for o in point if not o.lstrip("+~").startswith("hydra.")], cfg))
                continue
            is_sweep = is_sweep or generated[1]
            for values, strings in generated[0]:
                runs.append((own + strings, _set_keys(copy.deepcopy(cfg), values)))
    return runs, sweep_dir if is_sweep else None, {o.get_key_element().lstrip("+~") for o in parsed}


def sweep_points(parsed) -> list[list[str]]:
    """Every point of a sweep (-m) as one run's overrides, in the order Hydra's basic sweeper numbers
    its jobs: the product of each key's values, keys in order of first mention (a repeated key keeps
    its place, the last value wins). Hydra's public override API; intervals are refused."""
    values: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise HydraException(f"a sweep needs a list of values, not {o.value_type.name} ({key})")
        values[key] = ([f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                       else [f"{key}={o.get_value_element_as_str()}"])
    return [list(point) for point in itertools.product(*values.values())]


def _set_keys(cfg, values: dict):
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def to_train_config(cfg) -> TrainConfig:
    """DictConfig -> validated TrainConfig; ConfigError on any bad value."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(key, "???", "is required and has no value", f"set {key}=<value> on the command line") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(key, "?", str(exc).splitlines()[0], "fix the interpolation or value of this key")
    train_cfg = load_config(raw)
    validate(train_cfg, cuda_device_count=importlib.import_module("torch").cuda.device_count())  # late: --help
    return train_cfg


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # DeepSpeed's op checks log at INFO
    sys.exit(main(sys.argv[1:]))
