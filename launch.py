"""Train a language model with PEER, MoE or dense FFNs.

    python launch.py                                   # default experiment: small PEER LM, CPU, 1 process
    python launch.py model=moe trainer.max_steps=50    # any Hydra override
    python launch.py cluster.nproc_per_node=2 parallel.dp=2
    python launch.py --cfg job                         # print the composed config
    python launch.py --help                            # config groups; every key's doc: python -m orchestrator.config

The only place that sees Hydra's DictConfig: it is turned into plain dataclasses here, validated,
and handed to a launcher. Bad input exits with code 2 and one line, before any process starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from orchestrator.config import TrainConfig, load_config, to_dict, validate
from orchestrator.errors import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE, ConfigError

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
# Hydra flags that take a value in the next argument.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                     "--experimental-rerun", "--package", "-p"}
_INFO_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve",
               "--shell-completion", "-sc", "--version"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """DictConfig -> validated TrainConfig; ConfigError on any bad value."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(key, "???", "is required and has no value", f"set {key}=<value> on the command line")
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(key, "?", str(exc).splitlines()[0], "fix the interpolation or value of this key")
    train_cfg = load_config(raw)
    import torch  # late: keeps `--help` fast

    validate(train_cfg, cuda_device_count=torch.cuda.device_count())
    return train_cfg


def _precheck(argv: list[str]) -> None:
    """Compose and validate before Hydra's own run, so that every refusal is one line, exit 2.

    Hydra reports composition errors (unknown key, unknown group option, bad override syntax) over
    several lines with exit code 1; we compose the same overrides first and translate.
    """
    if any(a in ("-m", "--multirun") for a in argv) or any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        return  # multirun points are checked one by one in their jobs; info flags start nothing
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            fail(f"{override}: not a valid override; fix: write key=value (quote values with spaces or brackets)")
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        fail(_one_line_hydra_error(exc, overrides))
    try:
        to_train_config(cfg)
    except ConfigError as exc:
        fail(str(exc))


def _one_line_hydra_error(exc: Exception, overrides: list[str]) -> str:
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Could not find '" in text:  # unknown option of a config group, e.g. model=foo
        missing = text.split("Could not find '")[1].split("'")[0]
        group, _, option = missing.rpartition("/")
        options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")) if group else []
        return f"{group}={option}: unknown option of config group '{group}'; fix: use one of {', '.join(options)}"
    if "Could not override '" in text:  # unknown key
        key = text.split("Could not override '")[1].split("'")[0]
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=")[0].lstrip("+~") == key), "?")
        return (f"{key}={value}: unknown key; fix: check the spelling against `python launch.py --cfg job` "
                f"(docs of every key: `python -m orchestrator.config`)")
    return " ".join(lines) + "; fix: check the overrides"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train_cfg = to_train_config(cfg)
    except ConfigError as exc:
        fail(str(exc))
    from cluster.local import LaunchError, run_local
    from orchestrator.train import train_main

    try:
        run_local(train_main, (to_dict(train_cfg),), train_cfg.cluster.nproc_per_node,
                  run_id=train_cfg.run.name, log_dir=os.path.join(train_cfg.run.dir, "logs"))
    except LaunchError as exc:
        if exc.exit_code == REQUEUE_EXIT_CODE:
            print(f"stopped by a signal after a complete checkpoint; run the same command to resume "
                  f"(exit {REQUEUE_EXIT_CODE})", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code or 1)


if __name__ == "__main__":
    _precheck(sys.argv[1:])
    main()
