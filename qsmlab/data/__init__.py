"""Data layer: NIfTI I/O and validation, manifests, phantoms and simulation, TorchIO pipeline, folds."""
