"""The experiment platform (docs/architecture.md): runs, sweeps, leave-one-out batches, reports.

- :mod:`~qsmlab.lab.config`: layered experiment YAML (bases, profiles, dotted overrides)
- :mod:`~qsmlab.lab.cli`: ``qsmlab fit|validate|test|predict``: the command line read once, into a config
- :mod:`~qsmlab.lab.lightning_cli`: ``QSMLabCLI`` (the project's LightningCLI, fed a resolved dict)
- :mod:`~qsmlab.lab.config_errors`: one-line messages for rejected config values
- :mod:`~qsmlab.lab.run`: one run in one folder (``execute(RunOptions)``: provenance, loggers, final prediction)
- :mod:`~qsmlab.lab.tracking`: W&B (offline unless configured) and CSV loggers
- :mod:`~qsmlab.lab.provenance`: git commit, package versions, manifest hash, seed (``run_info.json``)
- :mod:`~qsmlab.lab.sweep_spec`, :mod:`~qsmlab.lab.storage`, :mod:`~qsmlab.lab.sweep`,
  :mod:`~qsmlab.lab.report`: ``qsmlab sweep`` (Optuna; journal or RDB storage; workers; resumable)
- :mod:`~qsmlab.lab.loocv`, :mod:`~qsmlab.lab.baselines`: ``qsmlab loocv`` with TKD / tuned-TV baselines
- :mod:`~qsmlab.lab.compare`, :mod:`~qsmlab.lab.figures`: reports and figures from the CSV logs
- :mod:`~qsmlab.lab.wandb_records`: read offline ``.wandb`` run files back

``qsmlab --help`` stays fast because the command modules import this package only when they run; W&B is
imported only where a W&B run exists. See docs/architecture.md (sections 5-8) for how a config, a run, a
sweep trial and a LOO fold go through these modules.
"""
