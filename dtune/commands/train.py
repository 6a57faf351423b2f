"""``dtune train [hydra overrides]`` (also ``python -m dtune.train``): compose the config with Hydra, run
:func:`dtune.train.run`, report how the run ended to the launcher (``$DTUNE_STATUS_FILE``, exit 75 to requeue), and
end the process group cleanly. The Hydra task returns the run's eval loss (:func:`dtune.sweep.run_objective`): the
value an Optuna sweep (``sweeper=optuna``) minimises."""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from dtune.config import compose, conf_dir, to_dataclass, validate
from dtune.distributed.env import shutdown_distributed
from dtune.distributed.preempt import INTERRUPT_EXIT, REQUEUE_EXIT, Preempted, under_submitit, write_status
from dtune.errors import ConfigError, user_errors
from dtune.schema import DtuneConfig
from dtune.sweep import point_to_outputs, run_objective
from dtune.train.loop import run

log = logging.getLogger("dtune")


def job_output_dir(cfg: DtuneConfig) -> Path:
    """``train.output_dir``, or Hydra's run directory of this job."""
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def check_overrides(argv: list[str]) -> None:
    """Compose a plain run's config before Hydra does, so that a misspelt key, a value of the wrong type or an
    unknown group option is one ``dtune: error:`` line and exit status 2, as every other bad input (Hydra reports
    them over several lines, exit 1, and proposes ``+key=`` for a misspelt key, which dtune refuses). Runs given
    Hydra's own flags (``--multirun`` sweeps, ``--config-dir``, ``--cfg``, ``--help``), settings of Hydra itself
    (``hydra.searchpath``, ``hydra.mode``, ``hydra/launcher=...``) or interpolations (``${hydra:...}`` resolves only
    inside the job) are left to Hydra."""
    if any(arg.startswith("-") or "${" in arg or arg.lstrip("+~").startswith(("hydra.", "hydra/")) for arg in argv):
        return
    with user_errors():
        compose(argv, check=False)


def check_sweep_output_dir(argv: list[str]) -> None:
    """A ``--multirun`` sweep with one ``train.output_dir`` for all its runs is refused: each run after the first would
    resume the previous one's last checkpoint there (``train.resume=auto``), train no step and report its results,
    and the sweep summary would find no run's results. Swept values (``a,b``) and interpolations
    (``${hydra:job.num}``) may differ per run and are left alone."""
    if not any(arg in ("-m", "--multirun") for arg in argv):
        return
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or "${" in arg:
            continue
        try:
            override = OverridesParser.create().parse_override(arg)
        except HydraException:
            continue  # Hydra reports it
        if override.key_or_group == "train.output_dir" and not override.is_sweep_override() and override.value():
            with user_errors():
                raise ConfigError(
                    f"train.output_dir: one directory ({override.value()}) for every run of a --multirun sweep: each run "
                    "would resume the one before from its checkpoint there; leave it unset (each run gets its own "
                    "folder of the sweep dir, multirun/<date>/<time>/<n>/) or sweep it (a,b or outputs/${hydra:job.num})"
                )


SWEEP_CHECK_LIMIT = 64  # runs of a listed sweep composed and validated before it starts


def check_sweep_runs(argv: list[str], limit: int = SWEEP_CHECK_LIMIT) -> None:
    """A listed ``--multirun`` sweep (Hydra's basic sweeper, ``a,b`` values): every run's config is composed and
    validated before the first run starts, so that a value dtune refuses stops the sweep at once, naming the run and
    the field, rather than after the runs before it trained (and with no summary). Sweeps of more than ``limit`` runs,
    Optuna's, and sweeps with interpolations are checked run by run as they go."""
    if not any(arg in ("-m", "--multirun") for arg in argv):
        return
    # Hydra's own settings (hydra.sweep.dir=..., hydra/launcher=...) configure the sweep, not a run.
    args = [arg for arg in argv if not arg.startswith("-") and not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if any("${" in a or a.lstrip("+~").startswith("sweeper") for a in args):
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args)
        values = [
            [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [arg]
            for arg, o in zip(args, overrides, strict=True)
        ]
    except (HydraException, ValueError, TypeError):  # Hydra reports a bad override; an interval sweep is Optuna's
        return
    runs = list(itertools.islice(itertools.product(*values), limit + 1))
    if len(runs) > limit:
        return
    with user_errors():
        for n, run in enumerate(runs):
            try:
                compose(list(run))
            except ConfigError as err:
                swept = " ".join(v for v, choices in zip(run, values, strict=True) if len(choices) > 1)
                raise ConfigError(f"--multirun: run #{n} of {len(runs)} ({swept}) would be refused: {err}") from None


def main() -> None:
    """``dtune train``: the overrides checked (:func:`check_overrides`, :func:`check_sweep_output_dir`,
    :func:`check_sweep_runs`), then the Hydra job."""
    check_sweep_output_dir(sys.argv[1:])
    check_overrides(sys.argv[1:])
    check_sweep_runs(sys.argv[1:])
    train_job()


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def train_job(dict_cfg: DictConfig) -> float | None:
    stopped: Preempted | None = None
    value: float | None = None
    with user_errors():
        cfg = to_dataclass(dict_cfg)
        validate(cfg)
        output_dir = job_output_dir(cfg)
        point_to_outputs(Path(HydraConfig.get().runtime.output_dir), output_dir)
        try:
            results = run(cfg, output_dir)
            write_status("done", results["steps"], str(output_dir))
            value = run_objective(output_dir, results)
        except Preempted as err:
            where = "while starting" if err.step is None else f"at step {err.step}"
            saved = "checkpoint written" if err.saved else "nothing new to save"
            if err.interrupted:
                log.warning("stopped %s on Ctrl-C: %s; the same command resumes it", where, saved)
            else:
                log.warning(
                    "stopped %s on %s: %s; exit %d asks the launcher to requeue", where, err.signal_name, saved, REQUEUE_EXIT
                )
            write_status("interrupted" if err.interrupted else "preempted", err.step, str(output_dir), err.signal_name)
            stopped = err
        except KeyboardInterrupt:  # Ctrl-C while setting up, or a second one: no traceback, nothing more saved
            print("dtune: interrupted; stopped at once (anything not in a checkpoint is not saved)", file=sys.stderr)
            raise SystemExit(INTERRUPT_EXIT) from None
    # Under submitit the task returns (its result is recorded) and submitit's own handler requeues the job.
    submitit = under_submitit()
    shutdown_distributed(
        exit_code=stopped.exit_code if stopped else 0, then=stopped.chain if stopped else None, exit_process=not submitit
    )
    if stopped and not submitit:
        raise SystemExit(stopped.exit_code)
    # A stopped run returns None: its requeued job returns the value (under submitit, the result the launcher reads).
    return value
