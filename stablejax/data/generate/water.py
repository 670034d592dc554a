"""Reference water data: flexible SPC/Fw with PME in OpenMM, written in the MDsim format.

Recipe (defaults follow the MDsim/StABlE water data, DESIGN.md):

1. 64 molecules in a 12.44287777 Å cubic box (0.997 g/cm^3), oxygens on a jittered
   4x4x4 lattice with random orientations, at the SPC/Fw geometry.
2. Energy minimisation (OpenMM L-BFGS).
3. Equilibration: Langevin (middle scheme) at 300 K with strong friction
   (``equilibration_friction_per_ps``, 10/ps) for ``equilibration_ps`` (10 ps).
4. Production: Langevin, friction ``friction_per_ps`` (1/ps), dt 0.5 fs; a frame every
   ``frame_interval_fs`` (10 fs = 20 steps): positions (wrapped and unwrapped),
   velocities (Å/fs, the middle-scheme half-step velocities), potential energy
   (kcal/mol) and forces (kcal/mol/Å).

Force field: :mod:`stablejax.data.generate.spcfw_jax` documents the parameters and the
``force_constants='mdsim'|'published'`` option. Electrostatics by PME with a 6 Å
real-space cutoff (below half the box) and Ewald tolerance 1e-5; Lennard-Jones on O-O
only, truncated at 6 Å, no dispersion correction; intramolecular pairs excluded.

Frames are produced in chunks (``chunk_frames``); each chunk runs in a fresh OpenMM
context whose random seed derives from (seed, chunk index) and starts from the saved
double-precision state of the previous chunk, so an interrupted run resumes at its last
complete chunk.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import numpy as np

from stablejax import geometry, units
from stablejax.data.dataset import Dataset
from stablejax.data.generate.cache import (
    ChunkStore,
    atomic_save_npz,
    cache_paths,
    write_sidecar,
)
from stablejax.data.generate.spcfw_jax import SPCFW, spcfw_coefficients
from stablejax.data.readers import write_mdsim_water

__all__ = [
    "WATER_BOX",
    "water_params",
    "build_spcfw_system",
    "initial_water_positions",
    "water_sanity",
    "block_standard_error",
    "generate_water",
]

#: Side of the cubic box of the MDsim water data, Å.
WATER_BOX = 12.44287777

_KCAL_TO_KJ = 4.184
_MASS_O = 15.9994
_MASS_H = 1.008


def water_params(
    *,
    n_frames: int,
    seed: int = 0,
    n_molecules: int = 64,
    box: float = WATER_BOX,
    temperature_K: float = 300.0,
    dt_fs: float = 0.5,
    frame_interval_fs: float = 10.0,
    friction_per_ps: float = 1.0,
    equilibration_ps: float = 10.0,
    equilibration_friction_per_ps: float = 10.0,
    force_constants: str = "mdsim",
    cutoff: float = 6.0,
    ewald_tolerance: float = 1e-5,
) -> dict:
    """All parameters that determine a water dataset (these make the cache key)."""
    stride = frame_interval_fs / dt_fs
    if abs(stride - round(stride)) > 1e-9 or stride < 1:
        raise ValueError(f"frame_interval_fs {frame_interval_fs} must be a multiple of dt_fs")
    spcfw_coefficients(force_constants)  # validates
    if int(n_frames) <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    n_side = round(n_molecules ** (1 / 3))
    if n_side**3 != n_molecules:
        raise ValueError(f"n_molecules must be a cube (lattice start), got {n_molecules}")
    if cutoff >= box / 2:
        raise ValueError(f"cutoff {cutoff} Å must be below half the box ({box / 2} Å)")
    return {
        "system": "water-spcfw",
        "n_frames": int(n_frames),
        "seed": int(seed),
        "n_molecules": int(n_molecules),
        "box": float(box),
        "temperature_K": float(temperature_K),
        "dt_fs": float(dt_fs),
        "frame_interval_fs": float(frame_interval_fs),
        "friction_per_ps": float(friction_per_ps),
        "equilibration_ps": float(equilibration_ps),
        "equilibration_friction_per_ps": float(equilibration_friction_per_ps),
        "force_constants": force_constants,
        "cutoff": float(cutoff),
        "ewald_tolerance": float(ewald_tolerance),
        "integrator": "LangevinMiddleIntegrator",
        "electrostatics": "PME",
    }


def build_spcfw_system(
    *,
    n_molecules: int,
    box: float,
    force_constants: str = "mdsim",
    cutoff: float = 6.0,
    ewald_tolerance: float = 1e-5,
):
    """The OpenMM ``System`` of `n_molecules` SPC/Fw waters (O, H, H order) in a cubic box."""
    import openmm
    from openmm import unit as u

    c_b, c_a = spcfw_coefficients(force_constants)
    system = openmm.System()
    L = box * 0.1  # nm
    system.setDefaultPeriodicBoxVectors(
        openmm.Vec3(L, 0, 0), openmm.Vec3(0, L, 0), openmm.Vec3(0, 0, L)
    )
    bonds = openmm.HarmonicBondForce()
    angles = openmm.HarmonicAngleForce()
    nonbonded = openmm.NonbondedForce()
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.PME)
    nonbonded.setCutoffDistance(cutoff * 0.1 * u.nanometer)
    nonbonded.setEwaldErrorTolerance(ewald_tolerance)
    nonbonded.setUseDispersionCorrection(False)
    nonbonded.setUseSwitchingFunction(False)
    # OpenMM's harmonic terms are (k/2)(x - x0)^2: k = 2 c with c the coefficient.
    k_bond = 2 * c_b * _KCAL_TO_KJ * 100.0  # kJ/mol/nm^2
    k_angle = 2 * c_a * _KCAL_TO_KJ  # kJ/mol/rad^2
    r0 = SPCFW["r0"] * 0.1
    theta0 = math.radians(SPCFW["theta0_deg"])
    sigma = SPCFW["sigma_OO"] * 0.1
    eps = SPCFW["epsilon_OO"] * _KCAL_TO_KJ
    bond_pairs = []
    for _ in range(n_molecules):
        o = system.addParticle(_MASS_O)
        h1 = system.addParticle(_MASS_H)
        h2 = system.addParticle(_MASS_H)
        nonbonded.addParticle(SPCFW["q_O"], sigma, eps)
        nonbonded.addParticle(SPCFW["q_H"], 0.1, 0.0)
        nonbonded.addParticle(SPCFW["q_H"], 0.1, 0.0)
        bonds.addBond(o, h1, r0, k_bond)
        bonds.addBond(o, h2, r0, k_bond)
        angles.addAngle(h1, o, h2, theta0, k_angle)
        bond_pairs += [(o, h1), (o, h2)]
    # 1-2 and 1-3 pairs (O-H, H-H) excluded entirely.
    nonbonded.createExceptionsFromBonds(bond_pairs, 0.0, 0.0)
    for i, force in enumerate((bonds, angles, nonbonded)):
        force.setForceGroup(i)
        system.addForce(force)
    system.addForce(openmm.CMMotionRemover())
    return system


def initial_water_positions(n_molecules: int, box: float, *, seed: int) -> np.ndarray:
    """[3 n, 3] Å: oxygens on a jittered cubic lattice, randomly oriented SPC/Fw geometry."""
    rng = np.random.default_rng(seed)
    n_side = round(n_molecules ** (1 / 3))
    spacing = box / n_side
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    oxygens = (grid + 0.5) * spacing + rng.uniform(-0.1, 0.1, size=grid.shape)
    half = math.radians(SPCFW["theta0_deg"]) / 2
    r0 = SPCFW["r0"]
    local = np.array(
        [
            [0, 0, 0],
            [r0 * math.sin(half), r0 * math.cos(half), 0],
            [-r0 * math.sin(half), r0 * math.cos(half), 0],
        ]
    )
    out = []
    for o in oxygens:
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        a, b, c, d = q
        rot = np.array(
            [
                [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
            ]
        )
        out.append(o + local @ rot.T)
    return np.concatenate(out, axis=0)


def block_standard_error(series, n_blocks: int = 10) -> float:
    """Standard error of the mean of a correlated time series from `n_blocks` block means."""
    x = np.asarray(series, np.float64)
    n_blocks = min(n_blocks, len(x))
    if n_blocks < 2:
        return float("nan")
    size = len(x) // n_blocks
    means = x[: size * n_blocks].reshape(n_blocks, size).mean(axis=1)
    return float(means.std(ddof=1) / np.sqrt(n_blocks))


def water_sanity(
    positions,
    velocities,
    *,
    box: float,
    dr: float = 0.05,
    r_max: float | None = None,
) -> dict:
    """Sanity figures of a water trajectory (O, H, H order).

    Args:
      positions: [m, 3 n, 3] Å.
      velocities: [m, 3 n, 3] Å/fs, or None.
      box: cubic box side, Å.

    Returns:
      dict with ``T_mean_K``, ``T_sem_K`` (standard error from 10 block means; it
      underestimates the error when the run is not much longer than the thermostat
      time 1/friction), ``oh_bond_mean``, ``hoh_angle_mean_deg``, ``goo_peak_position``,
      ``goo_peak_height``, and ``goo_r``/``goo`` (the O-O g(r)).
    """
    pos = np.asarray(positions, np.float64)
    m, n, _ = pos.shape
    o = pos[:, 0::3]
    b1 = pos[:, 1::3] - o
    b2 = pos[:, 2::3] - o
    sides = np.full(3, float(box))
    b1 = geometry.minimum_image_np(b1, sides)
    b2 = geometry.minimum_image_np(b2, sides)
    l1 = np.linalg.norm(b1, axis=-1)
    l2 = np.linalg.norm(b2, axis=-1)
    cosang = np.sum(b1 * b2, -1) / (l1 * l2)
    out = {
        "oh_bond_mean": float(np.mean(np.concatenate([l1, l2]))),
        "hoh_angle_mean_deg": float(np.degrees(np.mean(np.arccos(np.clip(cosang, -1, 1))))),
    }
    r_max = r_max or box / 2
    edges = np.arange(0.0, r_max + dr / 2, dr)
    n_o = o.shape[1]
    hist = np.zeros(len(edges) - 1)
    iu = np.triu_indices(n_o, k=1)
    for frame in o:
        d = frame[:, None] - frame[None, :]
        d = geometry.minimum_image_np(d, sides)
        r = np.linalg.norm(d, axis=-1)[iu]
        hist += np.histogram(r, edges)[0]
    shell = 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    density = n_o / box**3
    g = 2 * hist / (m * n_o * density * shell)
    centers = 0.5 * (edges[1:] + edges[:-1])
    first = np.argmax(g * (centers < 3.4))
    out.update(
        goo_peak_position=float(centers[first]),
        goo_peak_height=float(g[first]),
        goo_r=centers,
        goo=g,
    )
    if velocities is not None:
        from ase.data import atomic_masses

        masses = np.tile([atomic_masses[8], atomic_masses[1], atomic_masses[1]], n // 3)
        v = np.asarray(velocities, np.float64) / units.fs  # Å/fs -> Å/ASE time
        ke = 0.5 * np.einsum("i,mij->m", masses, v**2)
        temps = 2 * ke / ((3 * n - 3) * units.kB)
        out["T_mean_K"] = float(temps.mean())
        out["T_sem_K"] = block_standard_error(temps)
    return out


def _make_context(system, *, temperature_K, friction_per_ps, dt_fs, seed, threads):
    import openmm

    integrator = openmm.LangevinMiddleIntegrator(
        temperature_K, friction_per_ps, dt_fs * 1e-3
    )  # K, 1/ps, ps
    integrator.setRandomNumberSeed(int(seed))
    plat = openmm.Platform.getPlatformByName("CPU")
    return openmm.Context(system, integrator, plat, {"Threads": str(int(threads))})


def _seed_for(seed: int, chunk: int) -> int:
    # OpenMM treats seed 0 as "pick one at random": keep it positive and < 2^31.
    return int(np.random.default_rng([seed, chunk]).integers(1, 2**31 - 1))


def _equilibrate(system, params, threads, store_dir: Path, progress):
    """Minimise and equilibrate; returns (positions nm, velocities nm/ps, report)."""
    import openmm
    from openmm import unit as u

    path = store_dir / "equilibrated.npz"
    if path.exists():
        with np.load(path) as f:
            report = {k: float(f[k]) for k in f.files if k not in ("positions", "velocities")}
            return f["positions"], f["velocities"], report
    t0 = time.perf_counter()
    pos0 = initial_water_positions(params["n_molecules"], params["box"], seed=params["seed"])
    ctx = _make_context(
        system,
        temperature_K=params["temperature_K"],
        friction_per_ps=params["equilibration_friction_per_ps"],
        dt_fs=params["dt_fs"],
        seed=_seed_for(params["seed"], 10**6),
        threads=threads,
    )
    ctx.setPositions(pos0 * 0.1)
    e_start = (
        ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilocalorie_per_mole)
    )
    openmm.LocalEnergyMinimizer.minimize(ctx, 1.0, 2000)
    e_min = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilocalorie_per_mole)
    ctx.setVelocitiesToTemperature(params["temperature_K"], _seed_for(params["seed"], 10**6 + 1))
    n_steps = int(round(params["equilibration_ps"] * 1000 / params["dt_fs"]))
    n_blocks = 100
    temps, epots = [], []
    n_dof = 3 * system.getNumParticles() - 3
    bar = _bar(progress, n_steps, "equilibrating water", "step")
    done = 0
    for b in range(n_blocks):
        k = n_steps * (b + 1) // n_blocks - done
        ctx.getIntegrator().step(k)
        done += k
        st = ctx.getState(getEnergy=True)
        ke = st.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
        temps.append(2 * ke / (n_dof * 0.00831446261815324))
        epots.append(st.getPotentialEnergy().value_in_unit(u.kilocalorie_per_mole))
        if bar is not None:
            bar.update(k)
    if bar is not None:
        bar.close()
    st = ctx.getState(getPositions=True, getVelocities=True)
    positions = np.asarray(st.getPositions(asNumpy=True).value_in_unit(u.nanometer))
    velocities = np.asarray(
        st.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond)
    )
    half = len(temps) // 2
    report = {
        "epot_initial_kcal_mol": e_start,
        "epot_minimized_kcal_mol": e_min,
        "equilibration_T_second_half_K": float(np.mean(temps[half:])),
        "equilibration_epot_first_half_kcal_mol": float(np.mean(epots[:half])),
        "equilibration_epot_second_half_kcal_mol": float(np.mean(epots[half:])),
        "equilibration_seconds": time.perf_counter() - t0,
    }
    atomic_save_npz(path, positions=positions, velocities=velocities, **report)
    return positions, velocities, report


def _bar(progress, total, desc, unit, initial=0):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, smoothing=0.1)


def generate_water(
    out_dir,
    *,
    n_frames: int,
    seed: int = 0,
    chunk_frames: int = 500,
    threads: int = 1,
    progress: bool = True,
    keep_partial: bool = False,
    **physics,
) -> Path:
    """Generates (or finds in the cache) an SPC/Fw water trajectory in the MDsim format.

    Args:
      out_dir: cache directory; the file is ``water-spcfw_{hash}.npy`` with a ``.json``
        sidecar (parameters, equilibration report, sanity figures, frames/min).
      n_frames: number of frames (10 fs apart by default).
      seed: random seed (lattice jitter, orientations, velocities, Langevin noise).
      chunk_frames: frames per resumable chunk.
      threads: OpenMM CPU threads.
      progress: show a tqdm bar with ETA.
      keep_partial: keep the chunk directory after assembling the final file.
      **physics: any keyword of :func:`water_params` (temperature_K, dt_fs,
        frame_interval_fs, friction_per_ps, equilibration_ps, force_constants, ...).

    Returns:
      Path of the ``.npy`` file; read it with :func:`stablejax.data.load`.
    """
    from openmm import unit as u

    params = water_params(n_frames=n_frames, seed=seed, **physics)
    data_path, sidecar, partial = cache_paths(out_dir, "water-spcfw", params, "npy")
    if data_path.exists():
        return data_path
    partial.mkdir(parents=True, exist_ok=True)
    write_sidecar(partial / "params.json", params)
    system = build_spcfw_system(
        n_molecules=params["n_molecules"],
        box=params["box"],
        force_constants=params["force_constants"],
        cutoff=params["cutoff"],
        ewald_tolerance=params["ewald_tolerance"],
    )
    positions, velocities, eq_report = _equilibrate(system, params, threads, partial, progress)

    store = ChunkStore(partial)
    stride = int(round(params["frame_interval_fs"] / params["dt_fs"]))
    n_chunks = -(-n_frames // chunk_frames)
    done_chunks = store.completed()
    if done_chunks:
        last = store.load(done_chunks - 1)
        positions, velocities = last["state_positions"], last["state_velocities"]
    frames_done = min(done_chunks * chunk_frames, n_frames)
    bar = _bar(progress, n_frames, "water frames", "frame", initial=frames_done)
    t0 = time.perf_counter()
    produced = 0
    for c in range(done_chunks, n_chunks):
        n_here = min(chunk_frames, n_frames - c * chunk_frames)
        ctx = _make_context(
            system,
            temperature_K=params["temperature_K"],
            friction_per_ps=params["friction_per_ps"],
            dt_fs=params["dt_fs"],
            seed=_seed_for(params["seed"], c),
            threads=threads,
        )
        ctx.setPositions(positions)
        ctx.setVelocities(velocities)
        integ = ctx.getIntegrator()
        rec = {
            k: np.empty((n_here, system.getNumParticles(), 3))
            for k in ("unwrapped", "velocities", "forces")
        }
        energy = np.empty(n_here)
        for i in range(n_here):
            integ.step(stride)
            st = ctx.getState(getPositions=True, getVelocities=True, getEnergy=True, getForces=True)
            rec["unwrapped"][i] = st.getPositions(asNumpy=True).value_in_unit(u.angstrom)
            rec["velocities"][i] = st.getVelocities(asNumpy=True).value_in_unit(
                u.angstrom / u.femtosecond
            )
            rec["forces"][i] = st.getForces(asNumpy=True).value_in_unit(
                u.kilocalorie_per_mole / u.angstrom
            )
            energy[i] = st.getPotentialEnergy().value_in_unit(u.kilocalorie_per_mole)
            if bar is not None and (i % 10 == 9 or i == n_here - 1):
                bar.update(10 if i % 10 == 9 else (i % 10) + 1)
        st = ctx.getState(getPositions=True, getVelocities=True)
        positions = np.asarray(st.getPositions(asNumpy=True).value_in_unit(u.nanometer))
        velocities = np.asarray(
            st.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond)
        )
        store.save(
            c,
            unwrapped=rec["unwrapped"],
            velocities=rec["velocities"],
            forces=rec["forces"],
            energy=energy,
            state_positions=positions,
            state_velocities=velocities,
        )
        produced += n_here
        del ctx
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    data = store.load_all(["unwrapped", "velocities", "forces", "energy"])
    box = np.full(3, params["box"])
    species = np.tile([8, 1, 1], params["n_molecules"])
    ds = Dataset(
        species=species,
        positions=np.mod(data["unwrapped"], box),
        energies=data["energy"] * units.kcal_per_mol,
        forces=data["forces"] * units.kcal_per_mol,
        box=box,
        velocities=data["velocities"] / units.fs,
        frame_interval_fs=params["frame_interval_fs"],
        unwrapped_positions=data["unwrapped"],
    )
    sanity = water_sanity(data["unwrapped"], data["velocities"], box=params["box"])
    report = {
        "params": params,
        "params_hash": data_path.stem.split("_")[-1],
        "theory": f"SPC/Fw ({params['force_constants']} force constants), OpenMM PME",
        "equilibration": eq_report,
        "sanity": {k: v for k, v in sanity.items() if k not in ("goo_r", "goo")},
        "frames_per_minute": produced / seconds * 60 if produced else None,
        "threads": threads,
        "software": _versions(),
        "units": {
            "positions": "Angstrom",
            "energy": "kcal/mol",
            "forces": "kcal/mol/Angstrom",
            "velocities": "Angstrom/fs",
        },
    }
    write_mdsim_water(
        data_path,
        ds,
        extra={
            "theory": report["theory"],
            "generator": "stablejax.data.generate.water",
            "params_hash": report["params_hash"],
        },
    )
    write_sidecar(sidecar, report)
    if not keep_partial:
        store.remove()
    return data_path


def _versions() -> dict:
    out = {"python": platform.python_version()}
    try:
        import openmm

        out["openmm"] = openmm.__version__
    except ImportError:  # pragma: no cover
        pass
    return out
