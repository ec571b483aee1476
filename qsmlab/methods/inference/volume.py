"""One scan through a trained method: numpy (X, Y, Z) in, outputs out, in the scan's own grid.

:func:`infer_volume` resamples the images into the method's inference frame when the scan's B0 direction
or voxel size is off the training data's (:func:`qsmlab.methods.inference.frame.make_frame`, with a
warning), runs the method's full-volume inference (:meth:`QSMMethod.infer_images`; with ``tta="flips"`` the mean
over the kernel-preserving axis flips, :mod:`qsmlab.methods.inference.flips`) and resamples the outputs back.
Every setting is an argument: a cached model serves calls with different settings, and
nothing on the model changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from qsmlab.methods.inference.flips import kernel_preserving_flips, mirror_averaged


def describe_frame(frame, train_b0_dir) -> str:
    """What the frame does to a scan, for the one warning a method gives about it."""
    what = []
    if frame.rotated:
        what.append(f"B0 is {frame.angle_deg:.1f} deg from the training direction "
                    f"{np.round(np.asarray(train_b0_dir, dtype=float), 3).tolist()}: rotated to it")
    if frame.resampled:
        what.append(f"voxel size {np.round(frame.in_voxel_size, 3).tolist()} mm is > 25 % from the training "
                    f"{np.round(frame.out_voxel_size, 3).tolist()} mm: resampled to it")
    return "; ".join(what) + ", and the result back"


@torch.no_grad()
def infer_volume(model, images: Mapping[str, np.ndarray], voxel_size: Sequence[float], b0_dir: Sequence[float],
                 voxel_resampling: str | None = None, outputs: Sequence[str] | None = None,
                 tta: str | None = None) -> dict[str, np.ndarray]:
    """Full-volume outputs of ``model`` for one scan: ``{"chi": (X, Y, Z) ppm, masked, ...}``.

    Args:
        model: a method (:class:`QSMMethod` or the brain-masking net) in the mode it should run in.
        images: ``mask`` and the model's inputs, (X, Y, Z) numpy (fields in ppm).
        voxel_size: mm. b0_dir: unit B0 direction in voxel axes.
        voxel_resampling: ``"auto"`` / ``"never"`` for this call (None: the model's option).
        outputs: the outputs wanted (None: the model's ``inference_outputs``).
        tta: ``"none"`` / ``"flips"`` for this call (None: the model's option ``tta``): the mean over the axis
            flips that keep the dipole kernel of the geometry the network runs in (after the frame), each
            output flipped back (a model with ``b0_invariant`` set, the brain-masking net: all eight).

    Outputs of kind ``"ppm"`` are masked; an output with several channels keeps them first.
    """
    mask = np.asarray(images["mask"]) > 0.5
    frame = model.inference_frame(mask.shape, voxel_size, b0_dir, voxel_resampling, mask=mask)
    work = dict(images)
    geometry = (voxel_size, b0_dir)
    if frame is not None:
        train_b0 = model.train_b0_dir.cpu().numpy()
        model.warn_once("frame", f"{type(model).__name__}: {describe_frame(frame, train_b0)}")
        work = frame.forward(images)
        geometry = (frame.out_voxel_size, train_b0 if frame.rotated else b0_dir)
    tens = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None, None].to(model.device)
            for k, v in work.items() if v is not None}
    wanted = model.inference_outputs if outputs is None else tuple(outputs)
    if (tta or model.options.tta) == "flips":
        flips = kernel_preserving_flips(None if model.b0_invariant else geometry[1])
        out = mirror_averaged(lambda t: model.infer_images(t, geometry, outputs=wanted), tens, flips)
    else:
        out = model.infer_images(tens, geometry, outputs=wanted)
    res = {}
    for k, t in out.items():
        a = t[0].float().cpu().numpy()
        if frame is not None:
            a = np.stack([frame.backward(c) for c in a])
        if model.outputs.get(k) == "ppm":
            a = a * mask
        res[k] = a[0] if a.shape[0] == 1 else a
    return res
