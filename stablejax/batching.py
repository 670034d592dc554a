"""How a batch of independent frames (MD replicas, QM training frames) goes through a potential.

On an accelerator the whole batch is one ``jax.vmap``-ed call: one frame leaves most of
the device idle, so batching pays. On a CPU it does not: the flops per frame are the same
at every batch size, and the vmapped call's working set (every frame's edge features at
once) outgrows the caches. Passing the frames through the model a few at a time (a
``lax.map``/``lax.scan`` over passes, one compiled body) keeps it in cache. Measured on 2
CPU cores, float32 (one run each, `benchmarks/README.md`): energy+forces of 8 water
frames (192 atoms, small SchNet) 77 -> 35 ms; the QM training gradient of 4 such frames
104 -> 40 ms, and of 8 aspirin frames (paper SchNet) 56 -> 30 ms, with one frame per pass.

For gradients the passes are accumulated explicitly (each pass's value-and-grad inside the
scan body) rather than by differentiating through a ``lax.map``: reverse mode through the
map stores every pass's residuals and runs a second scan, which is slower than ``vmap``.

`frames_per_pass(n)`: 0/None -> all n frames in one pass on GPU/TPU; on a CPU as many as
share about `CPU_EDGES_PER_PASS` edges (at least one); k > 0 -> k.
Results equal the vmapped ones to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


#: Edges per pass on a CPU when the pass size is chosen automatically: the frames of a pass
#: share about this many edges (one 192-atom water frame at 4-5 Å has 5,000-10,000, so it
#: goes alone; an all-pairs aspirin frame has 420, so 4 go together; tiny systems batch).
#: Chosen from one sweep on 2 cores (interleaved, min of repeats): aspirin MD with the paper
#: SchNet at 32 replicas, 398 / 638 / 697 / 505 replica-steps/s at 2 / 4 / 8 / 32 (vmap) per
#: pass; the quick aspirin QM gradient of 32 frames 129 / 85 / 102 / 182 ms at 2 / 4 / 8 /
#: 32. A cheap pair network (benzene + Morse, 132 edges) would rather take all 128 replicas
#: at once (0.44 vs 0.52-0.55 ms per step at 7-15 per pass): the rule is a proxy for the
#: working set, not exact.
CPU_EDGES_PER_PASS = 2048


def frames_per_pass(n_frames: int, setting: int | None = None, *, edges_per_frame=None) -> int:
    """Frames evaluated together (1 <= k <= n_frames): `setting` when > 0; else all of them
    on an accelerator, and on a CPU as many as share `CPU_EDGES_PER_PASS` edges (one when
    `edges_per_frame` is not given). See the module docstring."""
    n = max(1, int(n_frames))
    if setting is not None and int(setting) < 0:
        raise ValueError(f"frames/replicas per pass must be >= 0 (0: automatic), got {setting}")
    if setting:
        return max(1, min(int(setting), n))
    if jax.default_backend() != "cpu":
        return n
    if not edges_per_frame:
        return 1
    return max(1, min(n, CPU_EDGES_PER_PASS // int(edges_per_frame)))


def _divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of n that is <= k (passes of equal size, no padding)."""
    return max(d for d in range(1, min(k, n) + 1) if n % d == 0)


def map_frames(fn: Callable, xs: PyTree, *, per_pass: int) -> PyTree:
    """``fn`` over the leading axis of every leaf of `xs`, `per_pass` frames at a time
    (``jax.vmap`` when `per_pass` covers them all, else ``lax.map``)."""
    n = jax.tree.leaves(xs)[0].shape[0]
    if per_pass >= n:
        return jax.vmap(fn)(xs)
    return lax.map(fn, xs, batch_size=int(per_pass))


def summed_value_and_grad(
    fn: Callable, params: PyTree, xs: PyTree, *, per_pass: int
) -> tuple[tuple[jax.Array, PyTree], PyTree]:
    """((sum_i v_i, sum_i aux_i), grad_params sum_i v_i) for ``fn(params, x_i) -> (v_i, aux_i)``
    over the leading axis of `xs`, `per_pass` frames per pass (gradients accumulated pass by
    pass; a pass size that does not divide the frames is lowered to one that does)."""
    n = jax.tree.leaves(xs)[0].shape[0]

    def pass_sum(p, chunk):
        values, aux = jax.vmap(fn, in_axes=(None, 0))(p, chunk)
        return jnp.sum(values), jax.tree.map(lambda a: jnp.sum(a, axis=0), aux)

    grad_fn = jax.value_and_grad(pass_sum, has_aux=True)
    if per_pass >= n:
        return grad_fn(params, xs)
    k = _divisor_at_most(n, int(per_pass))
    chunks = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), xs)

    def body(total, chunk):
        out = grad_fn(params, chunk)
        return jax.tree.map(jnp.add, total, out), None

    first = jax.tree.map(lambda a: a[0], chunks)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first)
    )
    total, _ = lax.scan(body, zeros, chunks)
    return total
