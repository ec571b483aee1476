"""The cache of parameter-free network inputs (qsmlab.methods.input_cache) and NeXtQSM's use of it: a hit is
the tensor a recomputation gives, any change of the bytes (a flip, a noise draw, the voxel size) misses,
the bound is in bytes (least recently used out first), and outside training nothing is cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsmlab.errors import QSMInputError
from qsmlab.methods import NeXtQSM
from qsmlab.methods.background_inputs import harmonic_residual, vsharp_estimate
from qsmlab.methods.inference import Context
from qsmlab.methods.input_cache import TensorCache, digest

TINY_NET = dict(bg_width=4, bg_depth=2, steps=2, reg_width=4, reg_depth=1, log_images=False)


def _head(shape=(24, 26, 22), seed=0):
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    m = ((g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 + (g[2] / 0.75) ** 2 <= 1.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    t = (0.5 * g[0] + 0.3 * g[1] * g[2] + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    return torch.from_numpy(t)[None, None], torch.from_numpy(m)[None, None]


def test_digest_sees_every_byte_dtype_shape_and_extra():
    a = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    b = a.clone()
    assert digest([a], (1,)) == digest([b], (1,))
    b[1, 2, 3] = float(np.nextafter(np.float32(23.0), np.float32(24.0)))  # one ulp
    assert digest([a], (1,)) != digest([b], (1,))
    assert digest([a], (1,)) != digest([a.flip(-1)], (1,))
    assert digest([a], (1,)) != digest([a.double()], (1,))
    assert digest([a], (1,)) != digest([a.reshape(4, 3, 2)], (1,))
    assert digest([a], (1,)) != digest([a], (2,))
    assert digest([a[:, :, ::2]], ()) == digest([a[:, :, ::2].contiguous()], ())  # views hash their values


def test_cache_hits_misses_and_byte_bound():
    calls = []

    def compute(v):
        def f():
            calls.append(v)
            return torch.full((256, 256), float(v))  # 256 KiB
        return f

    keys = [torch.tensor([float(i)]) for i in range(4)]
    cache = TensorCache(max_mb=0.6)  # room for two values
    x0 = cache.get_or_compute([keys[0]], (), compute(0))
    assert cache.get_or_compute([keys[0]], (), compute(99)) is x0  # hit: not recomputed
    assert (cache.hits, cache.misses, calls) == (1, 1, [0])
    cache.get_or_compute([keys[1]], (), compute(1))
    cache.get_or_compute([keys[0]], (), compute(99))  # 0 is now the most recently used
    cache.get_or_compute([keys[2]], (), compute(2))   # evicts 1, not 0
    assert len(cache) == 2 and cache.bytes == 2 * 256 * 256 * 4
    cache.get_or_compute([keys[0]], (), compute(99))
    cache.get_or_compute([keys[1]], (), compute(1))
    assert calls == [0, 1, 2, 1] and cache.hits == 3
    # a value larger than the bound is returned, not stored; max_mb 0 stores nothing
    big = TensorCache(max_mb=0.1).get_or_compute([keys[3]], (), compute(3))
    assert float(big[0, 0]) == 3.0
    off = TensorCache(max_mb=0)
    off.get_or_compute([keys[0]], (), compute(5))
    off.get_or_compute([keys[0]], (), compute(6))
    assert len(off) == 0 and calls[-2:] == [5, 6] and off.hits == 0
    with pytest.raises(ValueError, match="max_mb"):
        TensorCache(max_mb=-1)


def test_nextqsm_training_inputs_are_the_same_with_the_cache_and_only_training_uses_it():
    t, m = _head()
    field = 0.02 * t
    ctx = Context.of((1.5, 1.5, 1.5), (0.0, 0.0, 1.0), inputs=("total_field", "mask"), outputs=("chi", "local_field"))
    models = {}
    for mb in (0.0, 64.0):
        torch.manual_seed(0)
        model = NeXtQSM(**TINY_NET, background_init="vsharp", input_cache_mb=mb)
        model.set_statistics(0.01, (0.0, 0.0, 1.0), (1.5, 1.5, 1.5))
        model.total_field_scale.fill_(0.5)
        models[mb] = model.train()
    cached, plain = models[64.0], models[0.0]
    images = {"total_field": t, "mask": m, "field": field}
    ref = plain.network_inputs(images, ctx)
    first = cached.network_inputs(images, ctx)
    second = cached.network_inputs({k: v.clone() for k, v in images.items()}, ctx)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert (cached.input_cache.hits, cached.input_cache.misses) == (1, 1)
    # the cached channels are what the functions compute (SHARP residual, V-SHARP), in network units
    names = cached.channel_names(ctx)
    tm = t * m
    vs = torch.tensor([[1.5, 1.5, 1.5]])
    torch.testing.assert_close(second[:, names.index("harmonic")],
                               harmonic_residual(tm, m, vs, cached.smv_radius_mm)[:, 0] / cached.scale)
    torch.testing.assert_close(second[:, names.index("bg_init")], vsharp_estimate(tm, m, vs)[:, 0] / cached.scale)
    # a flipped head, another noise draw, another voxel size: misses, and equal to a recomputation
    for imgs, c in (({"total_field": t.flip(2), "mask": m.flip(2), "field": field.flip(2)}, ctx),
                    ({"total_field": _head(seed=1)[0], "mask": m, "field": field}, ctx),
                    (images, Context.of((1.5, 1.5, 2.0), (0.0, 0.0, 1.0), inputs=ctx.inputs, outputs=ctx.outputs))):
        before = cached.input_cache.misses
        torch.testing.assert_close(cached.network_inputs(imgs, c), plain.network_inputs(imgs, c), rtol=0, atol=0)
        assert cached.input_cache.misses == before + 1
    # eval mode (validation, predict) computes, and does not touch the cache
    cached.eval()
    state = (cached.input_cache.hits, cached.input_cache.misses, len(cached.input_cache))
    plain.eval()
    assert torch.equal(cached.network_inputs(images, ctx), plain.network_inputs(images, ctx))
    assert (cached.input_cache.hits, cached.input_cache.misses, len(cached.input_cache)) == state
    with pytest.raises(QSMInputError, match="model.input_cache_mb"):
        NeXtQSM(**TINY_NET, input_cache_mb=-1)
