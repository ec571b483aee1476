"""Plain inference beneath the Lightning methods (no Lightning, no hyper-parameters): the inference frame
(:mod:`.frame`), a network on a whole volume (:mod:`.network`), one numpy scan in and out (:mod:`.volume`)."""

from qsmlab.methods.inference.frame import (
    ANGLE_TOL_DEG,
    NEAREST_KEYS,
    VOXEL_TOL,
    Frame,
    b0_angle_deg,
    crop,
    make_frame,
    pad_to_multiple,
    rotation_onto,
    unit,
)
from qsmlab.methods.inference.network import (
    FIELD_INPUTS,
    Context,
    needs_windows,
    normalise_inputs,
    normalise_magnitude,
    run_on_volume,
    run_padded,
    sliding_windows,
    tkd_prior,
    window_roi,
)
from qsmlab.methods.inference.volume import describe_frame, infer_volume

__all__ = [
    "ANGLE_TOL_DEG", "FIELD_INPUTS", "NEAREST_KEYS", "VOXEL_TOL", "Context", "Frame", "b0_angle_deg", "crop", "describe_frame",
    "infer_volume", "make_frame", "needs_windows", "normalise_inputs", "normalise_magnitude", "pad_to_multiple", "rotation_onto",
    "run_on_volume", "run_padded", "sliding_windows", "tkd_prior", "unit", "window_roi",
]
