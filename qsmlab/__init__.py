"""qsmlab: deep-learning quantitative susceptibility mapping on one shared physics contract.

See docs/architecture.md for the layers. Units everywhere: chi and fields in ppm, phase in rad,
TE in s, B0 in T. Arrays keep NIfTI voxel order (i, j, k); tensors are [B, C, X, Y, Z].
"""

__version__ = "0.1.0"
