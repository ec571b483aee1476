"""``qsmlab sweep``: an Optuna study over any keys of an experiment's resolved config, tracked in W&B.

Flow (:func:`run_sweep`): read and check the sweep file (:mod:`qsmlab.lab.sweep_spec`) and the storage
(:mod:`qsmlab.lab.storage`) before anything trains; build the dataset once; then 1 or N local worker
processes each loop "recover dead trials -> stop if the budget is spent -> run one trial". A trial's
config is the sweep's base config (resolved once, in memory) with the trial's parameters set; it goes
straight to :func:`qsmlab.lab.run.execute` (``fit``, the path of ``qsmlab fit``) in
``runs/<study>/trials/trial-<nnnn>/`` (CSV log, checkpoints,
its own W&B run: group = study, name = ``trial-<n>``, config = resolved config + params, summary = final
metrics, ``final/chi`` figure) scored by the objective metric's last validation value. At the end:
``runs/<study>/trials.csv``, ``report.md``, ``objective_vs_params.png``, ``history.png`` and the best
parameters with their metrics printed as a table.

Budget and resumption. ``n_trials`` is the number of trials the study should hold, so a rerun of a killed
sweep runs only what is missing. Finished trials (COMPLETE, PRUNED, FAIL) are never rerun or lost: they
are in the storage. A trial whose worker died (SIGKILL, power loss) is still RUNNING in the storage; the
next worker on the same host that finds its process gone marks it FAIL (``qsmlab.crashed``) and enqueues
the same parameters as a new trial (``qsmlab.retry_of``), and such trials do not count toward the budget.
Only the worker whose FAIL update succeeds enqueues the retry, so a trial is retried once. On other hosts
(PostgreSQL), Optuna's heartbeat does the same after 180 s of silence. Ctrl-C marks the running trial
FAIL (``qsmlab.interrupted``) and enqueues its retry before exiting.

A trial that raises is FAIL with its error (``user_attrs["error"]``, the traceback in the trial's
``error.txt``, W&B exit code 1) and the study goes on. Pruning: optuna-integration's
``PyTorchLightningPruningCallback`` (it supports Lightning 2.6: it imports ``lightning.pytorch``) reports
the objective after each validation. DDP inside a trial (``trainer.devices > 1``) runs ``ddp_spawn`` (plain
``ddp`` re-executes this script on every rank) and needs an RDB storage; ``check_pruned()`` runs after fit.
Workers: ``--workers N`` starts N processes on one study with ``torch.set_num_threads(max(1, cores // N))``
and per-worker sampler seeds (the same seed would propose the same start-up points in every worker).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from qsmlab.errors import QSMInputError
from qsmlab.lab import config as C
from qsmlab.lab.config_errors import ConfigError
from qsmlab.lab.report import print_best, write_report
from qsmlab.lab.run import RunOptions, execute
from qsmlab.lab.run import prepare as prepare_run
from qsmlab.lab.storage import is_url, open_storage, storage_url
from qsmlab.lab.sweep_spec import SweepSpec, load_sweep, make_pruner, make_sampler

ATTR_WORKER = "qsmlab.worker"
ATTR_CRASHED = "qsmlab.crashed"
ATTR_INTERRUPTED = "qsmlab.interrupted"
ATTR_RETRY_OF = "qsmlab.retry_of"
ATTR_SEED_OF = "qsmlab.seed_of"  # a seed re-run of the best trial (its number); the seed is ATTR_SEED
ATTR_SEED = "qsmlab.seed"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_worker(n_workers: int) -> int:
    """``cores // n_workers`` (at least 1), capped by an explicit ``OMP_NUM_THREADS``."""
    n = max(1, cores() // max(1, n_workers))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(n, int(omp)) if omp.isdigit() and int(omp) > 0 else n


# -- worker identity and dead-trial recovery ------------------------------------------------------------------

def _start_ticks(pid: int) -> str | None:
    """Process start time (clock ticks since boot, /proc) so a reused pid is not mistaken for the worker."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid()) or ''}"


def _alive(wid: str) -> bool | None:
    """True/False for a worker on this host; None when it ran elsewhere (only heartbeats can tell)."""
    try:
        host, pid, ticks = wid.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    now = _start_ticks(pid)
    if now is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not ticks  # alive, but we cannot compare start times: trust it only without a record
    return not ticks or now == ticks


def _enqueue_retry(study, trial) -> None:
    study.enqueue_trial(dict(trial.params), user_attrs={ATTR_RETRY_OF: trial.number}, skip_if_exists=False)


def recover_dead_trials(study) -> list[int]:
    """Fail the RUNNING trials of dead local workers and enqueue each one's parameters again, once."""
    storage = study._storage
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        wid = t.user_attrs.get(ATTR_WORKER)
        if wid is None or _alive(wid) is not False:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, ATTR_CRASHED, True)
            ok = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first and enqueued the retry
        if ok:
            _enqueue_retry(study, t)
            recovered.append(t.number)
    return recovered


def heartbeat_stale(study, trial) -> None:
    """RDB heartbeat callback: a trial silent for the grace period (its host died) is retried once."""
    _enqueue_retry(study, trial)


def budget_used(study) -> int:
    """Trials that count toward ``n_trials``: all but the failed ones that were retried (crashed or
    interrupted trials, heartbeat-stale ones; their retry counts instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(ATTR_RETRY_OF) for t in trials} - {None}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried)
               and ATTR_SEED_OF not in t.user_attrs)


def enqueue_seed_reruns(study, spec: SweepSpec) -> list[int]:
    """Enqueue ``spec.seed_reruns`` re-runs of the best finished trial with other seeds (``seed_everything``
    and ``data.seed`` = base + 1, 2, ...), once: the seed-noise estimate the report sets the objective's
    spread against. Returns the seeds enqueued."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if ATTR_SEED_OF not in t.user_attrs and t.value is not None]
    if spec.seed_reruns <= 0 or not done:
        return []
    best = (min if spec.direction == "minimize" else max)(done, key=lambda t: t.value)
    have = {t.user_attrs.get(ATTR_SEED) for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get(ATTR_SEED_OF) == best.number and t.state != TrialState.FAIL}
    seeds = [k for k in range(1, spec.seed_reruns + 1) if k not in have]
    for k in seeds:
        study.enqueue_trial(dict(best.params), user_attrs={ATTR_SEED_OF: best.number, ATTR_SEED: k},
                            skip_if_exists=False)
    return seeds


def _waiting(study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


# -- one trial ------------------------------------------------------------------------------------------------

def _devices(cfg: dict) -> int:
    try:
        d = C.get_dotted(cfg, "trainer.devices")
    except QSMInputError:
        return 1
    if isinstance(d, (list, tuple)):
        return len(d)
    try:
        return int(d)
    except (TypeError, ValueError):
        return 1  # "auto": one device per trial unless asked


class FinalReportingPruningCallback(PyTorchLightningPruningCallback):
    """optuna-integration's ``PyTorchLightningPruningCallback`` (it imports ``lightning.pytorch`` and works
    with Lightning 2.6), except that the run's last validation is reported but never pruned: a trial that
    has already paid for its whole training keeps its result (COMPLETE with its value) instead of being
    discarded as PRUNED at the finish line. A module-level class: ``ddp_spawn`` (``trainer.devices: 2`` on
    CPU) pickles the trainer's callbacks into each process, and a class defined inside a function cannot be
    pickled."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.is_ddp_backend and not trainer.sanity_checking and _final_validation(trainer):
            score = trainer.callback_metrics.get(self.monitor)
            if score is not None:
                self._trial.report(float(score), step=pl_module.current_epoch)
            return
        super().on_validation_end(trainer, pl_module)


def pruning_callback(trial, monitor: str) -> FinalReportingPruningCallback:
    """The pruning callback of a trial (:class:`FinalReportingPruningCallback`)."""
    return FinalReportingPruningCallback(trial, monitor=monitor)


def _final_validation(trainer) -> bool:
    """Whether this validation is the run's last (max_steps reached, or the last batch of the last epoch)."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_batch = getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False)
    return bool(trainer.max_epochs is not None and trainer.max_epochs > 0
                and trainer.current_epoch >= trainer.max_epochs - 1 and last_batch)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class TrialObjective:
    """Optuna objective: suggest the parameters, run ``fit`` in the trial's folder, return the metric."""
    def __init__(self, spec: SweepSpec, base_cfg: dict, study_dir: Path):
        self.spec, self.base_cfg, self.study_dir = spec, base_cfg, study_dir

    def __call__(self, trial) -> float:
        spec = self.spec
        trial.set_user_attr(ATTR_WORKER, worker_id())
        params = {name: p.suggest(trial) for name, p in spec.search_space.items()}
        cfg = copy.deepcopy(self.base_cfg)
        for k, v in params.items():
            C.set_dotted(cfg, k, v)
        rerun = trial.user_attrs.get(ATTR_SEED_OF) is not None
        if rerun:  # the same parameters with another seed: network init, patch draws, augmentation
            k = int(trial.user_attrs[ATTR_SEED])
            cfg["seed_everything"] = int(cfg.get("seed_everything") or 0) + k
            try:
                data_seed = int(C.get_dotted(cfg, "data.seed") or 0)
            except QSMInputError:
                data_seed = 0
            C.set_dotted(cfg, "data.seed", data_seed + k, create=True)
        ddp = _devices(cfg) > 1
        if ddp:
            C.set_dotted(cfg, "trainer.strategy", "ddp_spawn", create=True)
        run_dir = self.study_dir / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        callbacks, pruning = [], None
        if spec.pruner["name"] != "none" and not rerun:
            pruning = pruning_callback(trial, spec.metric)
            callbacks.append(pruning)
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            result = execute(RunOptions(
                "fit", cfg, run_dir, given=params, experiment=Path(spec.experiment).stem, profile=spec.profile,
                loggers=spec.loggers, callbacks=callbacks,
                after_fit=(lambda cli: pruning.check_pruned()) if ddp and pruning else None,
                wandb_init={"group": trial.study.study_name, "name": f"trial-{trial.number}",
                            "job_type": "sweep-trial"},
                record={"study": trial.study.study_name, "trial": trial.number, "params": params}))
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(ATTR_INTERRUPTED, True)
            _enqueue_retry(trial.study, trial)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            raise
        finally:  # pruned and failed trials too: the budget and the benchmark count their cost
            trial.set_user_attr("cpu_seconds", round(time.process_time() - c0, 2))
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        metrics = {k: v for k, v in result.metrics.items() if k.startswith("val/")}
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("fit_seconds", round(result.fit_seconds, 2))
        trial.set_user_attr("fit_cpu_seconds", round(result.fit_cpu_seconds, 2))
        if spec.metric not in result.metrics:
            msg = (f"objective metric {spec.metric!r} was not logged by the model; logged: "
                   f"{', '.join(sorted(result.metrics)) or 'nothing (no validation data?)'}")
            trial.set_user_attr("error", msg)
            raise RuntimeError(msg)
        return result.metrics[spec.metric]


def progress_line(study, t, metric: str) -> str:
    """One line per finished trial: number, state, params, objective, best so far."""
    params = "  ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    if t.state == TrialState.COMPLETE:
        what = f"{metric}={t.value:.4g}"
    elif t.state == TrialState.PRUNED:
        last = max(t.intermediate_values.items()) if t.intermediate_values else None
        what = f"pruned at epoch {last[0]} ({metric}={last[1]:.4g})" if last else "pruned"
    else:
        what = "FAILED: " + str(t.user_attrs.get("error", "see error.txt"))[:160]
    try:
        b = study.best_trial
        best = f"best {b.value:.4g} (trial {b.number})"
    except ValueError:
        best = "best -"
    secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else 0
    cpu = t.user_attrs.get("cpu_seconds")
    took = f"{secs:.0f} s" + (f", CPU {cpu:.0f} s" if cpu is not None else "")
    return f"[{study.study_name}] trial {t.number:3d} {t.state.name:8s} {params}  {what}  {best}  [{took}]"


# -- workers --------------------------------------------------------------------------------------------------

def worker_loop(spec: SweepSpec, storage: str | None, study_dir: Path, base_cfg: dict, *, worker_index: int = 0,
                n_workers: int = 1, deadline: float | None = None, stop_after: int | None = None) -> int:
    """Run trials until the budget is spent (or ``deadline``, or ``stop_after`` trials of this worker).
    Returns the number of trials this worker ran."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one progress line per trial is printed instead
    for name in ("lightning.pytorch", "lightning.fabric"):  # per-trial banners (seed, GPU available, tips)
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(threads_per_worker(n_workers))
    st = open_storage(storage, study_dir, stale_trial_callback=heartbeat_stale)
    probe = optuna.load_study(study_name=spec.study, storage=st)
    sampler = make_sampler(spec, seed_offset=1000 * worker_index + len(probe.trials))
    study = optuna.load_study(study_name=spec.study, storage=st, sampler=sampler, pruner=make_pruner(spec))
    objective = TrialObjective(spec, base_cfg, study_dir)

    def report(s, t):
        print(progress_line(s, t, spec.metric), flush=True)

    ran = 0
    while True:
        recover_dead_trials(study)
        if deadline is not None and time.time() >= deadline:
            break
        if stop_after is not None and ran >= stop_after:
            break
        if not _waiting(study) and budget_used(study) >= spec.n_trials:
            break
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[report], gc_after_trial=True)
        ran += 1
    return ran


@dataclass
class SweepOutcome:
    study: str
    study_dir: Path
    storage: str
    seconds: float
    report: dict


def _check_ddp_storage(spec: SweepSpec, cfg: dict, storage: str | None) -> None:
    if _devices(cfg) > 1 and not is_url(storage):
        raise QSMInputError(f"{spec.path}: trainer.devices={_devices(cfg)} runs DDP (ddp_spawn) inside each trial, "
                            "which needs an RDB storage for pruning: give --storage postgresql://... or sqlite:///...")


def check_classes(spec: SweepSpec, cfg: dict, study_dir: Path) -> None:
    """Build the base config's model, datamodule and trainer once (nothing is written): a value only a
    constructor rejects (``trainer.max_steps: -5``, an unknown subject) fails here in one line instead of
    in every trial."""
    try:
        prepare_run(RunOptions("fit", cfg, study_dir / "trials" / "check", given=spec.overrides))
    except ConfigError as e:
        where = "overrides." if e.key in spec.overrides else ""
        raise QSMInputError(f"{spec.path}: {e.shown(where + (e.key or 'config'))}") from None


def prepare(sweep: str | Path, *, storage: str | None = None, n_trials: int | None = None,
            timeout: float | None = None, workers: int | None = None, study: str | None = None):
    """Every check that must pass before training: sweep file, keys, sampler/pruner arguments, storage.
    Returns ``(spec, base_cfg, study_dir, optuna_storage)`` with the study created (or loaded)."""
    spec = load_sweep(sweep)
    if n_trials is not None:
        if n_trials < 1:
            raise QSMInputError(f"--n-trials: expected a positive integer, got {n_trials}")
        spec.n_trials = n_trials
    if timeout is not None:
        spec.timeout = timeout
    if workers is not None:
        spec.workers = workers
    if spec.workers < 1:
        raise QSMInputError(f"--workers: expected a positive integer, got {spec.workers}")
    if study:
        spec.study = study
    try:
        make_sampler(spec)
        make_pruner(spec)
    except TypeError as e:
        raise QSMInputError(f"{spec.path}: sampler/pruner arguments: {e}") from None
    sdir = C.RUNS_DIR / spec.study
    cfg_nodata = spec.base_config(manifest=False)
    _check_ddp_storage(spec, cfg_nodata, storage)
    # a database is reached first (an unreachable URL stops before the dataset is built); a journal file
    # is created only once the config has passed every check
    st = open_storage(storage, sdir, stale_trial_callback=heartbeat_stale) if is_url(storage) else None
    base_cfg = spec.base_config(manifest=True)  # generates/caches the dataset once, before any worker
    check_classes(spec, base_cfg, sdir)
    if st is None:
        st = open_storage(storage, sdir, stale_trial_callback=heartbeat_stale)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(study_name=spec.study, storage=st, direction=spec.direction, load_if_exists=True)
    if s.direction.name.lower() != spec.direction:
        raise QSMInputError(f"study {spec.study!r} exists with direction {s.direction.name.lower()}, the sweep file "
                            f"says {spec.direction}; use --study NAME for a new study")
    s.set_user_attr("sweep_file", str(spec.path))
    s.set_user_attr("objective", spec.metric)
    sdir.mkdir(parents=True, exist_ok=True)
    return spec, base_cfg, sdir, st


def run_sweep(sweep: str | Path, *, storage: str | None = None, n_trials: int | None = None,
              timeout: float | None = None, workers: int | None = None, study: str | None = None,
              quiet: bool = False) -> SweepOutcome:
    """``qsmlab sweep``: see the module docstring."""
    t0 = time.time()
    spec, base_cfg, sdir, st = prepare(sweep, storage=storage, n_trials=n_trials, timeout=timeout,
                                       workers=workers, study=study)
    s = optuna.load_study(study_name=spec.study, storage=st)
    recovered = recover_dead_trials(s)
    used = budget_used(s)
    url = storage_url(storage, sdir)
    shown = url if not is_url(url) else url.split("@")[-1]
    if not quiet:
        print(f"[{spec.study}] sweep {spec.path.name}: {used}/{spec.n_trials} trials done, "
              f"{spec.workers} worker(s) x {threads_per_worker(spec.workers)} thread(s), storage {shown}"
              + (f"; re-queued crashed trial(s) {recovered}" if recovered else ""), flush=True)
    deadline = t0 + spec.timeout if spec.timeout else None
    def run_workers() -> None:
        if spec.workers == 1:
            worker_loop(spec, storage, sdir, base_cfg, deadline=deadline)
        else:
            _spawn_workers(spec, url, sdir, deadline)

    run_workers()
    s = optuna.load_study(study_name=spec.study, storage=st)
    seeds = enqueue_seed_reruns(s, spec) if deadline is None or time.time() < deadline else []
    if seeds:
        if not quiet:
            print(f"[{spec.study}] seed noise: re-running the best trial with seed offsets {seeds}", flush=True)
        run_workers()
        s = optuna.load_study(study_name=spec.study, storage=st)
    rep = write_report(s, spec, sdir)
    wall = time.time() - t0
    if not quiet:
        print_best(rep, spec)
        fr = rep["trials"]
        if len(fr) and "cpu_seconds" in fr and fr["cpu_seconds"].notna().any():
            per_worker = fr.groupby("worker")["cpu_seconds"].sum()
            print(f"[{spec.study}] wall {wall:.0f} s for this invocation; trial CPU time per worker process: "
                  + ", ".join(f"{v:.0f} s" for v in per_worker) + f" (load average {os.getloadavg()[0]:.1f})")
    return SweepOutcome(spec.study, sdir, url, wall, rep)


def _spawn_workers(spec: SweepSpec, url: str, sdir: Path, deadline: float | None) -> None:
    n = spec.workers
    threads = threads_per_worker(n)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = {"sweep": str(spec.path), "storage": url, "study": spec.study, "n_trials": spec.n_trials,
            "deadline": deadline, "workers": n, "study_dir": str(sdir)}
    procs = [subprocess.Popen([sys.executable, "-m", "qsmlab.lab.sweep", json.dumps({**args, "index": i})], env=env)
             for i in range(n)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.wait()  # each worker got the SIGINT too and records its interrupted trial
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} sweep workers exited with status {bad}; see their output above")


def _worker_main(payload: str) -> int:
    a = json.loads(payload)
    spec = load_sweep(a["sweep"], check_keys=False)
    spec.study, spec.n_trials = a["study"], int(a["n_trials"])
    sdir = Path(a["study_dir"])
    base_cfg = spec.base_config(manifest=True)  # cached by the parent: no generation here
    worker_loop(spec, a["storage"], sdir, base_cfg, worker_index=int(a["index"]), n_workers=int(a["workers"]),
                deadline=a["deadline"])
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="internal: one qsmlab sweep worker process")
    ap.add_argument("payload")
    sys.exit(_worker_main(ap.parse_args().payload))
