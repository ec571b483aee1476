"""The experiment platform (DESIGN.md section 5): runs, sweeps, leave-one-out batches, reports.

- :mod:`~qsmlab.lab.config`: layered experiment YAML (bases, profiles, dotted overrides)
- :mod:`~qsmlab.lab.cli`: ``QSMLabCLI`` (the project's LightningCLI) and ``qsmlab fit|validate|test|predict``
- :mod:`~qsmlab.lab.run`: one run in one folder (provenance, loggers, final prediction)
- :mod:`~qsmlab.lab.tracking`: W&B (offline unless configured) and CSV loggers
- :mod:`~qsmlab.lab.provenance`: git commit, package versions, manifest hash, seed (``run_info.json``)
- :mod:`~qsmlab.lab.sweep_spec`, :mod:`~qsmlab.lab.storage`, :mod:`~qsmlab.lab.sweep`,
  :mod:`~qsmlab.lab.report`: ``qsmlab sweep`` (Optuna; journal or RDB storage; workers; resumable)
- :mod:`~qsmlab.lab.loocv`, :mod:`~qsmlab.lab.baselines`: ``qsmlab loocv`` with TKD / tuned-TV baselines
- :mod:`~qsmlab.lab.compare`, :mod:`~qsmlab.lab.figures`: reports and figures from the CSV logs
- :mod:`~qsmlab.lab.wandb_records`: read offline ``.wandb`` run files back

Modules import Lightning, Optuna and W&B lazily where they can, so ``qsmlab --help`` stays fast.
"""
