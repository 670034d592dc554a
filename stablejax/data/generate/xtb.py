"""Reference molecule data: GFN2-xTB Langevin MD with tblite, written as sGDML npz.

Recipe for ``aspirin`` (21 atoms) and ``tetrapeptide`` (Ac-Ala3-NHMe, 42 atoms):

1. Starting geometry from SMILES with RDKit: ETKDG embedding (random seed per
   trajectory, so trajectories start from different conformers) and MMFF94
   optimisation.
2. A short GFN2-xTB relaxation (BFGS, at most ``optimize_steps`` steps) so the dynamics
   starts near an xTB minimum.
3. Maxwell-Boltzmann velocities at ``temperature_K`` (500 K), centre-of-mass motion and
   rotation removed; equilibration with ASE's Langevin integrator at strong friction
   (``equilibration_friction_per_ps``, 10/ps) for ``equilibration_ps`` (1 ps).
4. Production: Langevin at ``friction_per_ps`` (1/ps), dt 0.5 fs; a frame every
   ``stride`` steps (default 10 steps = 5 fs; MD17 stores every 0.5 fs step, which
   makes consecutive frames nearly identical).

``n_trajectories`` independent trajectories (default 2) share the frames and run in
separate processes (``multiprocessing`` with the ``spawn`` start method, up to
``n_workers`` at a time) so both cores are used; ``OMP_NUM_THREADS=1`` is set before
tblite is loaded (its OpenMP threads otherwise oversubscribe the cores, ~27x slower).
Frames are stored trajectory after trajectory; ``metadata['trajectory_starts']`` of
the loaded dataset gives the first frame of each.

Output: sGDML npz with ``R`` Å, ``z``, ``E`` kcal/mol, ``F`` kcal/mol/Å (the MD17
convention, stated in ``e_unit``), ``theory='GFN2-xTB'`` (this is semi-empirical tight
binding, never DFT), and a JSON sidecar with parameters, sanity figures and the rate.
The sanity ``T_sem_K`` is the expected error of a trajectory's mean temperature
(:func:`langevin_temperature_sem`): about 44 K for 3 ps of aspirin at friction 1/ps,
because a small molecule's total energy stays correlated for 1/friction; means of
435-445 K are therefore ordinary fluctuations, not a cold thermostat.

Chunks of ``chunk_frames`` frames per trajectory are saved atomically with the state to
continue from; each chunk's Langevin noise is seeded by (seed, trajectory, chunk), so a
resumed run continues from the last complete chunk and reproduces an uninterrupted one.
"""

from __future__ import annotations

import os
import platform
import queue as _queue
import time
import traceback
from pathlib import Path

import numpy as np

from stablejax import units
from stablejax.data.dataset import Dataset
from stablejax.data.generate.cache import (
    ChunkStore,
    atomic_save_npz,
    cache_paths,
    write_sidecar,
)
from stablejax.data.readers import write_sgdml_npz

__all__ = [
    "MOLECULES",
    "molecule_params",
    "rdkit_geometry",
    "generate_molecule",
    "langevin_dynamics",
    "langevin_temperature_sem",
    "molecule_sanity",
]

#: SMILES of the generated molecules.
MOLECULES = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "tetrapeptide": "CC(=O)NC(C)C(=O)NC(C)C(=O)NC(C)C(=O)NC",  # Ac-Ala3-NHMe
}

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def molecule_params(
    name: str,
    *,
    n_frames: int,
    seed: int = 0,
    temperature_K: float = 500.0,
    dt_fs: float = 0.5,
    stride: int = 10,
    friction_per_ps: float = 1.0,
    equilibration_ps: float = 1.0,
    equilibration_friction_per_ps: float = 10.0,
    optimize_steps: int = 100,
    n_trajectories: int = 2,
    chunk_frames: int = 100,
    method: str = "GFN2-xTB",
) -> dict:
    """All parameters that determine a molecule dataset (these make the cache key)."""
    if name not in MOLECULES:
        raise ValueError(f"unknown molecule {name!r}; known: {sorted(MOLECULES)}")
    if int(n_frames) <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    if int(n_trajectories) < 1 or int(n_trajectories) > int(n_frames):
        raise ValueError(f"n_trajectories must lie in [1, n_frames], got {n_trajectories}")
    if int(stride) < 1 or int(chunk_frames) < 1:
        raise ValueError("stride and chunk_frames must be positive")
    return {
        "system": name,
        "smiles": MOLECULES[name],
        "n_frames": int(n_frames),
        "seed": int(seed),
        "temperature_K": float(temperature_K),
        "dt_fs": float(dt_fs),
        "stride": int(stride),
        "friction_per_ps": float(friction_per_ps),
        "equilibration_ps": float(equilibration_ps),
        "equilibration_friction_per_ps": float(equilibration_friction_per_ps),
        "optimize_steps": int(optimize_steps),
        "n_trajectories": int(n_trajectories),
        "chunk_frames": int(chunk_frames),
        "method": method,
        "integrator": "ase.md.langevin.Langevin",
    }


def rdkit_geometry(smiles: str, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers [n] and positions [n, 3] Å of an ETKDG + MMFF94 conformer (with H)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed) % (2**31 - 1)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles!r} (seed {seed})")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    species = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return species, np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)


def _frames_per_trajectory(n_frames: int, n_traj: int) -> list[int]:
    return [n_frames // n_traj + (1 if j < n_frames % n_traj else 0) for j in range(n_traj)]


def _rng(seed: int, traj: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, traj, chunk])


def langevin_dynamics(atoms, *, dt_fs: float, temperature_K: float, friction_per_ps: float, rng):
    """The generator's thermostat: ASE Langevin with the centre of mass held by FixCom.

    Args:
      atoms: ASE Atoms with a calculator; its constraints are replaced by ``FixCom``.
      dt_fs: time step, fs.
      temperature_K: bath temperature, K.
      friction_per_ps: Langevin friction, 1/ps.
      rng: numpy Generator for the noise.

    Returns:
      The ``ase.md.langevin.Langevin`` object; the kinetic temperature counts 3n - 3
      degrees of freedom.
    """
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    # Centre of mass held by a constraint (ASE's fixcm=True option biases small systems).
    atoms.set_constraint(FixCom())
    return Langevin(
        atoms,
        timestep=dt_fs * units.fs,
        temperature_K=temperature_K,
        friction=units.friction_per_ps_to_ase(friction_per_ps),
        fixcm=False,
        rng=rng,
    )


def _trajectory_worker(job: dict, progress_queue) -> None:
    """Runs (or resumes) one trajectory in its own process; reports progress by queue."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"  # before tblite (and its OpenMP runtime) loads
    try:
        _run_trajectory(job, progress_queue)
        progress_queue.put(("done", job["traj"], None))
    except BaseException:
        progress_queue.put(("error", job["traj"], traceback.format_exc()))
        raise


def _run_trajectory(job: dict, progress_queue) -> None:
    from ase import Atoms
    from ase.md.velocitydistribution import (
        MaxwellBoltzmannDistribution,
        Stationary,
        ZeroRotation,
    )
    from ase.optimize import BFGS
    from tblite.ase import TBLite

    p = job["params"]
    j = job["traj"]
    n_target = job["n_frames"]
    store = ChunkStore(job["partial"], prefix=f"traj{j}")
    eq_path = Path(job["partial"]) / f"traj{j}_equilibrated.npz"
    seed = p["seed"]

    def make_atoms(species, positions):
        atoms = Atoms(numbers=species, positions=positions)
        atoms.calc = TBLite(method=p["method"], verbosity=0)
        return atoms

    def langevin(atoms, friction_per_ps, rng):
        return langevin_dynamics(
            atoms,
            dt_fs=p["dt_fs"],
            temperature_K=p["temperature_K"],
            friction_per_ps=friction_per_ps,
            rng=rng,
        )

    if eq_path.exists():
        with np.load(eq_path) as f:
            species, positions, velocities = f["species"], f["positions"], f["velocities"]
            eq_report = {k: float(f[k]) for k in f.files if k.startswith("eq_")}
    else:
        t0 = time.perf_counter()
        species, positions = rdkit_geometry(p["smiles"], seed=seed * 1000 + j)
        atoms = make_atoms(species, positions)
        e_mmff = atoms.get_potential_energy()
        if p["optimize_steps"] > 0:
            BFGS(atoms, logfile=None).run(fmax=0.05, steps=p["optimize_steps"])
        e_opt = atoms.get_potential_energy()
        rng = _rng(seed, j, 10**6)
        MaxwellBoltzmannDistribution(atoms, temperature_K=p["temperature_K"], rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
        dyn = langevin(atoms, p["equilibration_friction_per_ps"], rng)
        n_eq = int(round(p["equilibration_ps"] * 1000 / p["dt_fs"]))
        temps = []
        for _ in range(10):
            dyn.run(n_eq // 10)
            temps.append(atoms.get_temperature())
        positions, velocities = atoms.get_positions(), atoms.get_velocities()
        eq_report = {
            "eq_energy_rdkit_geometry_eV": float(e_mmff),
            "eq_energy_relaxed_eV": float(e_opt),
            "eq_T_last_half_K": float(np.mean(temps[5:])),
            "eq_seconds": time.perf_counter() - t0,
        }
        atomic_save_npz(
            eq_path, species=species, positions=positions, velocities=velocities, **eq_report
        )

    done = store.completed()
    frames_done = 0
    for c in range(done):
        frames_done += len(store.load(c)["E"])
    if done:
        last = store.load(done - 1)
        positions, velocities = last["state_positions"], last["state_velocities"]
    progress_queue.put(("progress", j, frames_done))
    c = done
    while frames_done < n_target:
        n_here = min(p["chunk_frames"], n_target - frames_done)
        atoms = make_atoms(species, positions)
        atoms.set_velocities(velocities)
        dyn = langevin(atoms, p["friction_per_ps"], _rng(seed, j, c))
        R = np.empty((n_here, len(species), 3))
        F = np.empty_like(R)
        V = np.empty_like(R)
        E = np.empty(n_here)
        t0 = time.perf_counter()
        for i in range(n_here):
            dyn.run(p["stride"])
            R[i] = atoms.get_positions()
            # Raw forces: the FixCom constraint would remove their net component.
            F[i] = atoms.get_forces(apply_constraint=False)
            V[i] = atoms.get_velocities()
            E[i] = atoms.get_potential_energy()
            progress_queue.put(("progress", j, 1))
        store.save(
            c,
            R=R,
            E=E,
            F=F,
            V=V,
            seconds=np.array(time.perf_counter() - t0),
            state_positions=atoms.get_positions(),
            state_velocities=atoms.get_velocities(),
        )
        positions, velocities = atoms.get_positions(), atoms.get_velocities()
        frames_done += n_here
        c += 1
    atomic_save_npz(Path(job["partial"]) / f"traj{j}_report.npz", **eq_report)


def _run_all(jobs, n_workers, n_frames, name, progress):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_frames, desc=f"{name} frames (GFN2-xTB)", unit="frame", smoothing=0.1)
    pending = list(jobs)
    running: dict[int, mp.Process] = {}
    finished = set()
    errors = []
    saved_env = {v: os.environ.get(v) for v in _THREAD_VARS}
    try:
        while pending or running:
            while pending and len(running) < n_workers:
                job = pending.pop(0)
                # Children copy the parent's environment at spawn time.
                for v in _THREAD_VARS:
                    os.environ[v] = "1"
                proc = ctx.Process(target=_trajectory_worker, args=(job, q), daemon=True)
                proc.start()
                for v, old in saved_env.items():
                    if old is None:
                        os.environ.pop(v, None)
                    else:
                        os.environ[v] = old
                running[job["traj"]] = proc
            try:
                kind, traj, payload = q.get(timeout=0.5)
                if kind == "progress" and bar is not None:
                    bar.update(payload)
                elif kind == "error":
                    errors.append(f"trajectory {traj}:\n{payload}")
                elif kind == "done":
                    finished.add(traj)
            except _queue.Empty:
                pass
            for traj, proc in list(running.items()):
                if not proc.is_alive():
                    proc.join()
                    del running[traj]
                    if proc.exitcode != 0 and not errors:
                        errors.append(f"trajectory {traj}: worker exited with {proc.exitcode}")
            if errors:
                for proc in running.values():
                    proc.terminate()
                raise RuntimeError("GFN2-xTB generation failed; " + "\n".join(errors))
        # Drain the remaining progress messages.
        while True:
            try:
                kind, traj, payload = q.get_nowait()
            except _queue.Empty:
                break
            if kind == "progress" and bar is not None:
                bar.update(payload)
    finally:
        if bar is not None:
            bar.close()


def langevin_temperature_sem(
    temperature_K: float,
    *,
    n_atoms: int,
    friction_per_ps: float,
    duration_ps: float,
    n_frames: int,
) -> float:
    """Expected standard error (K) of the mean kinetic temperature of one Langevin run.

    Model: a molecule of ``n_atoms`` atoms, centre of mass fixed (3n - 3 degrees of
    freedom: 3n - 6 vibrations and 3 rotations), friction gamma on every atom. The
    kinetic energy of a vibration is half a slow part (its total energy, which the
    bath exchanges at rate gamma; exact for harmonic modes) and half an oscillating
    part, taken as independent between frames; a rotation's kinetic energy relaxes at
    rate 2 gamma. The variance of the time average of a process with correlation time
    tau over a window t is var * w(t / tau), w(x) = 2/x - 2 (1 - exp(-x)) / x^2.

    For aspirin at 500 K, friction 1/ps and 3 ps this gives 44 K: the total energy,
    hence the temperature, of a small molecule stays correlated for 1/gamma, and a run
    of a few 1/gamma holds only a few independent values of it. Block averages over
    such a run underestimate this error several-fold.

    Args:
      temperature_K: bath temperature, K.
      n_atoms: atoms in the molecule (at least 3).
      friction_per_ps: Langevin friction, 1/ps.
      duration_ps: length of the averaged run, ps.
      n_frames: frames averaged.

    Returns:
      Standard error of <T>, K.
    """
    if n_atoms < 3 or friction_per_ps <= 0 or duration_ps <= 0 or n_frames < 1:
        raise ValueError(
            "need n_atoms >= 3 and positive friction_per_ps, duration_ps and n_frames; got "
            f"{n_atoms}, {friction_per_ps}, {duration_ps}, {n_frames}"
        )

    def window(x):
        return 2.0 / x - 2.0 * (-np.expm1(-x)) / x**2

    dof = 3 * n_atoms - 3
    n_vib, n_rot = 3 * n_atoms - 6, 3
    x = friction_per_ps * duration_ps
    # Per-frame variance of T is 2 T^2 / dof = (T / dof)^2 (2 n_vib + 2 n_rot).
    var = (temperature_K / dof) ** 2 * (
        n_vib * window(x) + 2 * n_rot * window(2 * x) + n_vib / n_frames
    )
    return float(np.sqrt(var))


def molecule_sanity(
    species,
    R,
    V,
    E,
    *,
    temperature_K: float | None = None,
    friction_per_ps: float | None = None,
    frame_interval_fs: float | None = None,
) -> dict:
    """Sanity figures of one trajectory.

    Args:
      species: [n] atomic numbers.
      R: [m, n, 3] positions, Å.
      V: [m, n, 3] velocities, Å/(ASE time).
      E: [m] potential energies (any unit; reported as given, named eV).
      temperature_K: bath temperature, K.
      friction_per_ps: Langevin friction of the run, 1/ps.
      frame_interval_fs: time between frames, fs.

    Returns:
      dict with ``T_mean_K`` (3n - 3 degrees of freedom), ``T_sem_K`` (the expected
      standard error from :func:`langevin_temperature_sem` when the three keywords are
      given, else the block estimate), ``T_sem_blocks_K`` (from 10 block means; it
      underestimates the error of runs not much longer than 1/friction), energy mean/std,
      and the largest deviation (Å) of a bond length from its trajectory mean, bonds
      from covalent radii on the first frame.
    """
    from ase.data import atomic_masses

    from stablejax.data.generate.water import block_standard_error

    masses = atomic_masses[np.asarray(species)]
    v = np.asarray(V)  # Å/(ASE time)
    ke = 0.5 * np.einsum("i,mij->m", masses, v**2)
    temps = 2 * ke / ((3 * len(species) - 3) * units.kB)
    sem_blocks = block_standard_error(temps)
    sem = sem_blocks
    if None not in (temperature_K, friction_per_ps, frame_interval_fs):
        sem = langevin_temperature_sem(
            temperature_K,
            n_atoms=len(species),
            friction_per_ps=friction_per_ps,
            duration_ps=len(temps) * frame_interval_fs / 1000.0,
            n_frames=len(temps),
        )
    out = {
        "T_mean_K": float(temps.mean()),
        "T_sem_K": sem,
        "T_sem_blocks_K": sem_blocks,
        "energy_mean_eV": float(np.mean(E)),
        "energy_std_eV": float(np.std(E)),
    }
    try:
        from stablejax.data.topology import find_bonds

        bonds = find_bonds(species, R[0])
        d = np.linalg.norm(R[:, bonds[:, 0]] - R[:, bonds[:, 1]], axis=-1)
        out["n_bonds"] = len(bonds)
        out["max_bond_deviation_A"] = float(np.max(np.abs(d - d.mean(axis=0))))
    except ImportError:  # pragma: no cover - topology is part of the package
        pass
    return out


def generate_molecule(
    name: str,
    out_dir,
    *,
    n_frames: int,
    seed: int = 0,
    n_workers: int = 2,
    progress: bool = True,
    keep_partial: bool = False,
    **physics,
) -> Path:
    """Generates (or finds in the cache) GFN2-xTB MD frames of aspirin or Ac-Ala3-NHMe.

    Args:
      name: ``'aspirin'`` or ``'tetrapeptide'``.
      out_dir: cache directory; the file is ``{name}-gfn2xtb_{hash}.npz`` plus a
        ``.json`` sidecar (parameters, sanity figures, frames/min).
      n_frames: total frames over all trajectories.
      seed: random seed (conformers, velocities, Langevin noise).
      n_workers: processes run at once (one core each).
      progress: show a tqdm bar with ETA.
      keep_partial: keep the chunk directory after assembling the final file.
      **physics: any keyword of :func:`molecule_params` (temperature_K, dt_fs, stride,
        friction_per_ps, equilibration_ps, n_trajectories, chunk_frames, ...).

    Returns:
      Path of the ``.npz`` file; read it with :func:`stablejax.data.load`.
    """
    params = molecule_params(name, n_frames=n_frames, seed=seed, **physics)
    data_path, sidecar, partial = cache_paths(out_dir, f"{name}-gfn2xtb", params, "npz")
    if data_path.exists():
        return data_path
    partial.mkdir(parents=True, exist_ok=True)
    write_sidecar(partial / "params.json", params)
    counts = _frames_per_trajectory(params["n_frames"], params["n_trajectories"])
    jobs = [
        {"params": params, "traj": j, "n_frames": counts[j], "partial": str(partial)}
        for j in range(params["n_trajectories"])
    ]
    t0 = time.perf_counter()
    _run_all(jobs, max(1, int(n_workers)), params["n_frames"], name, progress)
    wall = time.perf_counter() - t0

    parts, reports, starts, sanity = [], [], [], []
    chunk_seconds = 0.0
    species = None
    for j in range(params["n_trajectories"]):
        store = ChunkStore(partial, prefix=f"traj{j}")
        data = store.load_all(["R", "E", "F", "V"])
        for c in range(store.completed()):
            chunk_seconds += float(store.load(c)["seconds"])
        with np.load(partial / f"traj{j}_equilibrated.npz") as f:
            species = f["species"]
        with np.load(partial / f"traj{j}_report.npz") as f:
            reports.append({k: float(f[k]) for k in f.files})
        starts.append(sum(len(p["E"]) for p in parts))
        parts.append(data)
        sanity.append(
            molecule_sanity(
                species,
                data["R"],
                data["V"],
                data["E"],
                temperature_K=params["temperature_K"],
                friction_per_ps=params["friction_per_ps"],
                frame_interval_fs=params["stride"] * params["dt_fs"],
            )
        )
    R = np.concatenate([p["R"] for p in parts])
    ds = Dataset(
        species=species,
        positions=R,
        energies=np.concatenate([p["E"] for p in parts]),
        forces=np.concatenate([p["F"] for p in parts]),
        frame_interval_fs=params["stride"] * params["dt_fs"],
    )
    produced_frames = len(R)
    report = {
        "params": params,
        "params_hash": data_path.stem.split("_")[-1],
        "theory": params["method"],
        "n_atoms": int(len(species)),
        "trajectory_starts": starts,
        "equilibration": reports,
        "sanity": sanity,
        # Per-core rate from the chunks' own timing, and the wall-clock rate of this call
        # (all workers together; includes start-up, relaxation and equilibration).
        "frames_per_minute_per_core": produced_frames / chunk_seconds * 60,
        "frames_per_minute_wall": produced_frames / wall * 60,
        "ms_per_md_step": chunk_seconds / (produced_frames * params["stride"]) * 1e3,
        "n_workers": int(n_workers),
        "software": _versions(),
        "units": {"positions": "Angstrom", "energy": "kcal/mol", "forces": "kcal/mol/Angstrom"},
    }
    write_sgdml_npz(
        data_path,
        ds,
        energy_unit="kcal/mol",
        theory=params["method"],
        name=f"{name} ({params['smiles']}), {params['method']} MD at {params['temperature_K']} K",
        extra={"trajectory_starts": np.array(starts, dtype=np.int64)},
    )
    write_sidecar(sidecar, report)
    if not keep_partial:
        ChunkStore(partial).remove()
    return data_path


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("tblite", "rdkit", "ase"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):  # pragma: no cover
            pass
    return out
