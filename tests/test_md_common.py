"""Shared helpers for the MD tests (no tests here): a tiny LJ energy and start geometries.

The Lennard-Jones energy is written here (not imported from the potentials
package) so that the MD tests depend only on the energy-function contract:
``energy_fn(params, positions [n,3] Å, edges [2,e] (padding n), box [3] | None)``.
It uses the shifted-force form, so energy and force are continuous at the
cutoff and NVE conserves energy to O(dt^2).
"""

import jax.numpy as jnp
import numpy as np

from stablejax.potentials.base import edge_vectors

ARGON = {"sigma": 3.405, "epsilon": 0.0103}  # Å, eV


def make_lj(cutoff=None):
    """Shifted-force LJ ``energy_fn``; ``cutoff`` None means no truncation (free space)."""

    def energy_fn(params, positions, edges, box):
        sigma, eps = params["sigma"], params["epsilon"]
        d, mask = edge_vectors(positions, edges, box)
        r2 = jnp.sum(d * d, axis=-1)
        if cutoff is not None:
            mask = mask & (r2 < cutoff**2)
        r2 = jnp.where(mask, r2, 4.0 * sigma**2)  # double where: padded pairs stay finite
        r = jnp.sqrt(r2)

        def v(r):
            s6 = (sigma / r) ** 6
            return 4.0 * eps * (s6 * s6 - s6)

        def dv(r):
            s6 = (sigma / r) ** 6
            return 4.0 * eps * (-12.0 * s6 * s6 + 6.0 * s6) / r

        e = v(r)
        if cutoff is not None:
            e = e - v(cutoff) - (r - cutoff) * dv(cutoff)
        return 0.5 * jnp.sum(jnp.where(mask, e, 0.0))

    return energy_fn


def lj_numpy_energy(positions, box, sigma, eps, cutoff):
    """Independent all-pairs NumPy LJ energy (shifted-force, minimum image)."""
    d = positions[None, :, :] - positions[:, None, :]
    if box is not None:
        d = d - box * np.round(d / box)
    r = np.linalg.norm(d, axis=-1)
    iu = np.triu_indices(len(positions), 1)
    r = r[iu]
    r = r[r < cutoff]
    s6 = (sigma / r) ** 6
    sc6 = (sigma / cutoff) ** 6
    v_c = 4 * eps * (sc6 * sc6 - sc6)
    dv_c = 4 * eps * (-12 * sc6 * sc6 + 6 * sc6) / cutoff
    return float(np.sum(4 * eps * (s6 * s6 - s6) - v_c - (r - cutoff) * dv_c))


def cluster(n_side=2, spacing=3.8):
    """Simple-cubic argon cluster of n_side^3 atoms, [n, 3] Å."""
    g = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return g * spacing


def lattice(n_side, box_side):
    """Simple-cubic lattice filling a cubic box: ([n, 3] Å, box [3] Å)."""
    a = box_side / n_side
    return cluster(n_side, a) + 0.25 * a, np.full(3, float(box_side))
