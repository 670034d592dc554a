"""Boltzmann estimator vs differentiating through MD, on a Lennard-Jones fluid.

Reproduces the comparison of the StABlE paper's Appendix A.13 (Fig. 13): 32 LJ particles
in a periodic box, a prior pair potential holding only the repulsive term of LJ
(4 eps (sigma/r)^12), and a learned pair-MLP correction (5 hidden layers of 128) trained
so that the simulated radial distribution function g(r) matches that of the full LJ
potential. The gradient of the RDF loss w.r.t. the MLP parameters is computed three ways
for trajectories of increasing length:

  boltzmann:        the Boltzmann estimator (`stablejax.boltzmann_grad`) on frames of
                    the trajectory; the dynamics are never differentiated.
  backprop:         jax.grad through the unrolled integrator (lax.scan over jax-md's
                    Nose-Hoover chain step).
  backprop_remat:   the same with jax.checkpoint on every step (memory ~ one state/step).
  adjoint:          continuous adjoint (jax.experimental.ode.odeint, dopri5) of the
                    Nose-Hoover ODE (one thermostat variable).

For each method and length it reports the gradient norm (mean and spread over seeds, i.e.
initial velocities), the peak memory from XLA's compiled memory analysis
(`jax.jit(f).lower(...).compile().memory_analysis()`, also on CPU) and the wall time of
one gradient (simulation included, compile excluded, minimum over seeds). It then trains
the MLP with the Boltzmann estimator for a few hundred Adam steps on persistent replicas
and reports the RDF error before and after.

Units: LJ reduced units throughout (sigma = epsilon = mass = k_B = 1, time in
tau = sigma sqrt(m / epsilon)); for argon multiply lengths by 3.405 Å, energies by
0.0103 eV (T* = 1 is 119.8 K) and times by 2.15 ps. Density rho* = 0.8, kT* = 1,
dt = 0.005 tau. The box side (3.42 sigma for 32 particles) limits the interaction cutoff
and the RDF range to half the box (1.7 sigma); both the target and the model use LJ
truncated and shifted there.

Usage:
  python -m benchmarks.lj_differentiation --out runs/lj_diff            # paper sizes
  python -m benchmarks.lj_differentiation --quick --out runs/lj_quick   # minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.ode import odeint
from jax_md import simulate, space

from stablejax.estimator import boltzmann_grad
from stablejax.observables import bin_centers, radial_distribution_function
from stablejax.potentials import pair

# jax-md's kinetic energy asks for a float64 sum; in float32 runs that only warns.
warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")

KT = 1.0
DT = 0.005
TAU_THERMOSTAT = 0.5  # Nose-Hoover coupling time (tau units, absolute time for jax-md)
DENSITY = 0.8
N_CELLS = 2  # FCC 2x2x2 = 32 particles
# Frames per minibatch of the Boltzmann estimator, the same at every trajectory length so
# that its memory does not grow with the trajectory: the peak is one minibatch's forward +
# backward pass (measured, MLP 3 x 64: 50 frames 62 MiB, 10 frames 12.7 MiB); the frames
# themselves are 38 KB per 100.
ESTIMATOR_BATCH = 10
METHODS = ("boltzmann", "backprop", "backprop_remat", "adjoint")


# --------------------------------------------------------------------------------------
# system
# --------------------------------------------------------------------------------------


def fcc_lattice(n_cells: int, density: float):
    """FCC positions [4 n_cells^3, 3] and cubic box side at the given number density."""
    n = 4 * n_cells**3
    side = (n / density) ** (1.0 / 3.0)
    a = side / n_cells
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cells = np.array(np.meshgrid(*[np.arange(n_cells)] * 3, indexing="ij")).reshape(3, -1).T
    pos = (cells[:, None, :] + basis[None]).reshape(-1, 3) * a + 0.25 * a
    return pos.astype(np.float32), side


class System:
    """The LJ box, the target potential, the model and the RDF observable."""

    def __init__(self, hidden, r_bins_dr=0.02, rdf_sigma=0.02):
        self.positions0, side = fcc_lattice(N_CELLS, DENSITY)
        self.n = self.positions0.shape[0]
        self.box = jnp.full(3, side, jnp.float32)
        self.cutoff = 0.499 * side
        self.dr = r_bins_dr
        self.r_max = round(math.floor(self.cutoff / r_bins_dr) * r_bins_dr, 10)
        self.rdf_sigma = rdf_sigma
        self.r = bin_centers(self.r_max, self.dr)
        # Unique pairs only (i < j): the total energy is twice the per-atom sum over them,
        # which halves the cost of every model evaluation.
        i, j = np.triu_indices(self.n, k=1)
        self.half_edges = jnp.asarray(np.stack([i, j]).astype(np.int32))
        self.displacement, self.shift = space.periodic(side)

        lj = pair.default_config("lennard_jones")
        lj.sigma, lj.epsilon, lj.cutoff = 1.0, 1.0, self.cutoff
        self.target_potential = pair.build(lj)
        self.target_params = self.target_potential.init(None, None, self.positions0, self.box)

        mlp = pair.default_config("pair_mlp")
        mlp.cutoff = self.cutoff
        mlp.hidden_sizes = tuple(hidden)
        mlp.prior = "repulsive"
        mlp.prior_sigma, mlp.prior_epsilon = 1.0, 1.0
        mlp.energy_scale = 1.0
        mlp.n_rbf = 16
        self.model = pair.build(mlp)
        self.model_config = mlp

    def _energy(self, potential, params, R):
        e = potential.per_atom_energies(params, None, R, self.half_edges, self.box)
        return 2.0 * jnp.sum(e)

    def model_energy(self, params, R):
        """Total model energy (epsilon) of positions R [n, 3] (sigma)."""
        return self._energy(self.model, params, R)

    def target_energy(self, R):
        return self._energy(self.target_potential, self.target_params, R)

    def rdf(self, R):
        """Smeared g(r) [n_bins] of one frame (differentiable, for the unrolled methods)."""
        return radial_distribution_function(
            R, None, self.box, pair=None, r_max=self.r_max, dr=self.dr, sigma=self.rdf_sigma
        )

    def nose_hoover(self, energy_fn):
        return simulate.nvt_nose_hoover(energy_fn, self.shift, DT, KT, tau=TAU_THERMOSTAT)


def rdf_loss(g, g_target):
    return jnp.sum((g - g_target) ** 2)


# --------------------------------------------------------------------------------------
# the three gradient methods, for a trajectory of `n_steps` steps from R0
# --------------------------------------------------------------------------------------


def make_methods(system: System, n_steps: int, sample_every: int, g_target):
    n_frames = n_steps // sample_every

    def simulate_frames(params, R0, key, remat=False):
        energy = lambda R, params: system.model_energy(params, R)
        init_fn, step_fn = system.nose_hoover(energy)
        state = init_fn(key, R0, mass=1.0, params=params)

        def block(s, _):
            # One block of `sample_every` steps, returning its last frame.
            def one(s, _):
                return step_fn(s, params=params), None

            one_step = jax.checkpoint(one) if remat else one
            s, _ = jax.lax.scan(one_step, s, None, length=sample_every)
            return s, s.position

        _, frames = jax.lax.scan(block, state, None, length=n_frames)
        return frames  # [n_frames, n, 3]

    def unrolled_loss(params, R0, key, remat):
        frames = simulate_frames(params, R0, key, remat)
        return rdf_loss(jnp.mean(jax.vmap(system.rdf)(frames), axis=0), g_target)

    def backprop(params, R0, key):
        return jax.value_and_grad(unrolled_loss)(params, R0, key, False)

    def backprop_remat(params, R0, key):
        return jax.value_and_grad(unrolled_loss)(params, R0, key, True)

    # Frames are processed in minibatches of ESTIMATOR_BATCH (exact, the last one padded),
    # so the estimator's memory does not grow with the trajectory length.
    estimator = boltzmann_grad(
        system.model_energy,
        system.rdf,
        lambda g: rdf_loss(g, g_target),
        kT=KT,
        batch_size=min(ESTIMATOR_BATCH, n_frames),
    )

    def boltzmann(params, R0, key):
        frames = simulate_frames(jax.lax.stop_gradient(params), R0, key)
        (loss, _), grads = estimator(params, frames)
        return loss, grads

    def adjoint_loss(params, R0, key):
        # Nose-Hoover ODE, one thermostat momentum p_xi with mass Q = dof kT tau^2.
        dof = R0.size
        q_mass = dof * KT * TAU_THERMOSTAT**2
        p0 = jnp.sqrt(KT) * jax.random.normal(key, R0.shape, R0.dtype)
        p0 = p0 - jnp.mean(p0, axis=0)
        force = jax.grad(lambda R, p: -system.model_energy(p, R))

        def rhs(y, t, p):
            R, P, p_xi = y
            dP = force(R, p) - (p_xi / q_mass) * P
            return P, dP, jnp.sum(P * P) - dof * KT

        ts = jnp.arange(n_frames + 1, dtype=R0.dtype) * (sample_every * DT)
        y0 = (R0, p0, jnp.zeros((), R0.dtype))
        Rs, _, _ = odeint(rhs, y0, ts, params, rtol=1e-5, atol=1e-5, mxstep=20 * sample_every)
        g = jnp.mean(jax.vmap(system.rdf)(Rs[1:]), axis=0)
        return rdf_loss(g, g_target)

    def adjoint(params, R0, key):
        return jax.value_and_grad(adjoint_loss)(params, R0, key)

    return {
        "boltzmann": boltzmann,
        "backprop": backprop,
        "backprop_remat": backprop_remat,
        "adjoint": adjoint,
    }


def peak_memory_bytes(compiled) -> int:
    """Peak device memory of a compiled function from XLA's buffer assignment.

    temp + arguments + outputs - aliased; `peak_memory_in_bytes` is used when it is larger
    (on CPU it is not populated meaningfully in jax 0.10).
    """
    stats = compiled.memory_analysis()
    total = (
        stats.temp_size_in_bytes
        + stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return int(max(total, int(getattr(stats, "peak_memory_in_bytes", 0) or 0)))


def global_norm(tree) -> float:
    return float(optax.global_norm(tree))


# --------------------------------------------------------------------------------------
# reference data
# --------------------------------------------------------------------------------------


def equilibrate_and_target(system: System, *, n_replicas, n_equil, n_sample, sample_every, seed):
    """Equilibrated starting positions [n_replicas, n, 3] and the target g(r) of full LJ."""
    init_fn, step_fn = system.nose_hoover(lambda R: system.target_energy(R))
    keys = jax.random.split(jax.random.PRNGKey(seed), n_replicas)
    R0 = jnp.broadcast_to(system.positions0, (n_replicas,) + system.positions0.shape)

    @jax.jit
    def run(keys, R0):
        states = jax.vmap(lambda k, R: init_fn(k, R, mass=1.0))(keys, R0)
        step = jax.vmap(step_fn)

        def equil(s, _):
            return step(s), None

        states, _ = jax.lax.scan(equil, states, None, length=n_equil)

        def block(s, _):
            s, _ = jax.lax.scan(equil, s, None, length=sample_every)
            return s, jax.vmap(system.rdf)(s.position)

        states, g = jax.lax.scan(block, states, None, length=n_sample // sample_every)
        return states.position, jnp.mean(g, axis=(0, 1))

    return run(keys, R0)


# --------------------------------------------------------------------------------------
# gradient-method comparison
# --------------------------------------------------------------------------------------


def compare_methods(system, params, R0s, g_target, *, lengths, seeds, sample_every, time_limit,
                    max_run_bytes):  # fmt: skip
    results = {m: {"steps": [], "grad_norm": [], "grad_norm_std": [], "peak_memory_bytes": [],
                   "time_s": [], "compile_s": [], "status": []} for m in METHODS}  # fmt: skip
    exhausted = {m: False for m in METHODS}
    for n_steps in lengths:
        methods = make_methods(system, n_steps, sample_every, g_target)
        for name in METHODS:
            res = results[name]
            res["steps"].append(int(n_steps))
            key0 = jax.random.PRNGKey(0)
            t0 = time.perf_counter()
            try:
                compiled = jax.jit(methods[name]).lower(params, R0s[0], key0).compile()
                memory = peak_memory_bytes(compiled)
            except Exception as err:  # e.g. allocation failure at compile time
                res["compile_s"].append(None)
                res["peak_memory_bytes"].append(None)
                res["grad_norm"].append(None)
                res["grad_norm_std"].append(None)
                res["time_s"].append(None)
                res["status"].append(f"compile failed: {type(err).__name__}")
                print(f"{name:15s} {n_steps:6d} steps: compile failed ({err})", flush=True)
                continue
            res["compile_s"].append(time.perf_counter() - t0)
            res["peak_memory_bytes"].append(memory)
            skip = None
            if exhausted[name]:
                skip = "skipped: time limit reached at a shorter length"
            elif memory > max_run_bytes:
                skip = f"skipped: needs {memory / 2**30:.1f} GiB > --max-run-memory-gb"
            if skip:
                res["grad_norm"].append(None)
                res["grad_norm_std"].append(None)
                res["time_s"].append(None)
                res["status"].append(skip)
                print(f"{name:15s} {n_steps:6d} steps: mem {memory / 2**20:9.1f} MiB (not run)")
                continue
            norms, times = [], []
            status = "ok"
            for s in range(seeds):
                key = jax.random.PRNGKey(1000 + s)
                t = time.perf_counter()
                try:
                    loss, grads = compiled(params, R0s[s % len(R0s)], key)
                    jax.block_until_ready(grads)
                except Exception as err:  # runtime allocation failure
                    status = f"run failed: {type(err).__name__}"
                    break
                times.append(time.perf_counter() - t)
                norms.append(global_norm(grads))
                if times[-1] > time_limit:
                    break
            finite = [x for x in norms if math.isfinite(x)]
            if norms and len(finite) < len(norms):
                status = "non-finite gradient"
            res["grad_norm"].append(float(np.mean(norms)) if norms else None)
            res["grad_norm_std"].append(float(np.std(norms)) if len(norms) > 1 else None)
            res["time_s"].append(float(np.min(times)) if times else None)
            res["status"].append(status)
            if not times or min(times) > time_limit:
                exhausted[name] = True
            print(
                f"{name:15s} {n_steps:6d} steps: |grad| {res['grad_norm'][-1]} "
                f"± {res['grad_norm_std'][-1]}, mem {memory / 2**20:9.1f} MiB, "
                f"time {res['time_s'][-1]} s [{status}]",
                flush=True,
            )
    return results


# --------------------------------------------------------------------------------------
# training with the Boltzmann estimator
# --------------------------------------------------------------------------------------


def train_boltzmann(system, params, R0s, g_target, *, n_iters, steps_per_iter, sample_every, lr,
                    n_eval_steps, seed):  # fmt: skip
    n_rep = R0s.shape[0]
    energy = lambda R, params: system.model_energy(params, R)
    init_fn, step_fn = system.nose_hoover(energy)
    estimator = boltzmann_grad(
        system.model_energy, system.rdf, lambda g: rdf_loss(g, g_target), kT=KT
    )
    optimizer = optax.adam(lr)

    def run(params, states, n_steps):
        step = jax.vmap(lambda s: step_fn(s, params=params))

        def block(s, _):
            s, _ = jax.lax.scan(lambda s, _: (step(s), None), s, None, length=sample_every)
            return s, s.position

        states, frames = jax.lax.scan(block, states, None, length=n_steps // sample_every)
        return states, frames.reshape((-1,) + frames.shape[2:])

    @jax.jit
    def train_step(params, opt_state, states):
        states, frames = run(params, states, steps_per_iter)
        (loss, aux), grads = estimator(params, frames)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, states, loss

    @functools.partial(jax.jit, static_argnums=2)
    def evaluate(params, states, n_steps):
        states, frames = run(params, states, n_steps)
        return states, jnp.mean(jax.vmap(system.rdf)(frames), axis=0)

    keys = jax.random.split(jax.random.PRNGKey(seed), n_rep)
    states = jax.vmap(lambda k, R: init_fn(k, R, mass=1.0, params=params))(keys, R0s)
    # Before: equilibrate the prior-only model, then measure its g(r).
    states, _ = evaluate(params, states, n_eval_steps)
    _, g_before = evaluate(params, states, n_eval_steps)
    opt_state = optimizer.init(params)
    losses = []
    t0 = time.perf_counter()
    for it in range(n_iters):
        params, opt_state, states, loss = train_step(params, opt_state, states)
        losses.append(float(loss))
        if it % max(1, n_iters // 10) == 0:
            print(f"  train step {it:4d}: loss {losses[-1]:.4f}", flush=True)
    train_time = time.perf_counter() - t0
    states, _ = evaluate(params, states, n_eval_steps)
    _, g_after = evaluate(params, states, n_eval_steps)
    return params, {
        "losses": losses,
        "g_before": np.asarray(g_before),
        "g_after": np.asarray(g_after),
        "train_time_s": train_time,
    }


# --------------------------------------------------------------------------------------
# plots and main
# --------------------------------------------------------------------------------------


LABELS = {
    "boltzmann": "Boltzmann estimator",
    "backprop": "backprop (unrolled)",
    "backprop_remat": "backprop + checkpoint",
    "adjoint": "adjoint (odeint)",
}


def plot_comparison(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, res in results.items():
        steps = np.array(res["steps"], float)
        for ax, key, scale in (
            (axes[0], "grad_norm", 1.0),
            (axes[1], "peak_memory_bytes", 2.0**-20),
            (axes[2], "time_s", 1.0),
        ):
            y = np.array([np.nan if v is None else v * scale for v in res[key]], float)
            if key == "grad_norm":
                err = np.array([np.nan if v is None else v for v in res["grad_norm_std"]], float)
                ax.errorbar(steps, y, yerr=err, marker="o", label=LABELS[name], capsize=3)
            else:
                ax.plot(steps, y, marker="o", label=LABELS[name])
    for ax, title in zip(
        axes,
        ("gradient norm", "peak memory (MiB, XLA analysis)", "time per gradient (s)"),
        strict=True,
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("trajectory length (steps)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(system, g_target, train, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(system.r, g_target, "k-", label="target (full LJ)")
    axes[0].plot(system.r, train["g_before"], "--", label="prior + MLP, before")
    axes[0].plot(system.r, train["g_after"], "-", label="prior + MLP, after")
    axes[0].set_xlabel("r (sigma)")
    axes[0].set_ylabel("g(r)")
    axes[0].legend()
    axes[1].plot(train["losses"])
    axes[1].set_yscale("log")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("RDF loss (Boltzmann estimator samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rdf_mae(g, g_target):
    return float(np.mean(np.abs(np.asarray(g) - np.asarray(g_target))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/lj_differentiation")
    parser.add_argument("--quick", action="store_true", help="small sizes, minutes on 2 CPUs")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--hidden", type=int, nargs="*", default=None)
    parser.add_argument("--train-iters", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=None, help="s per gradient")
    parser.add_argument(
        "--max-run-memory-gb",
        type=float,
        default=4.0,
        help="do not run (only compile and report memory of) gradients needing more",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="write the JSON only (no matplotlib needed)"
    )
    args = parser.parse_args(argv)

    if args.quick:
        defaults = dict(lengths=[100, 300, 1000], seeds=3, hidden=[64] * 3, train_iters=200,
                        time_limit=20.0, steps_per_iter=40, n_rep=8, sample_every=10,
                        n_eval=1000, target_steps=2000)  # fmt: skip
    else:
        defaults = dict(lengths=[100, 300, 1000, 3000, 10000], seeds=5, hidden=[128] * 5,
                        train_iters=300, time_limit=600.0, steps_per_iter=100, n_rep=16,
                        sample_every=10, n_eval=5000, target_steps=20000)  # fmt: skip
    lengths = args.lengths or defaults["lengths"]
    seeds = args.seeds or defaults["seeds"]
    hidden = args.hidden or defaults["hidden"]
    train_iters = args.train_iters if args.train_iters is not None else defaults["train_iters"]
    time_limit = args.time_limit or defaults["time_limit"]
    sample_every = defaults["sample_every"]
    os.makedirs(args.out, exist_ok=True)

    t_start = time.perf_counter()
    system = System(hidden)
    R0s, g_target = equilibrate_and_target(
        system,
        n_replicas=max(seeds, defaults["n_rep"]),
        n_equil=1000,
        n_sample=defaults["target_steps"],
        sample_every=20,
        seed=0,
    )
    print(f"target g(r) ready ({time.perf_counter() - t_start:.1f} s)", flush=True)
    params = system.model.init(jax.random.PRNGKey(42), None, system.positions0, system.box)
    # Start the comparison from a non-trivial correction (zero-init output gives an
    # all-zero gradient to the hidden layers at the very first step only).
    params = jax.tree.map(lambda x: x, params)
    params["params"]["out"]["kernel"] = 0.01 * jax.random.normal(
        jax.random.PRNGKey(7), params["params"]["out"]["kernel"].shape
    )

    results = compare_methods(
        system, params, R0s, g_target, lengths=lengths, seeds=seeds,
        sample_every=sample_every, time_limit=time_limit,
        max_run_bytes=args.max_run_memory_gb * 2**30,
    )  # fmt: skip
    if not args.no_plots:
        plot_comparison(results, os.path.join(args.out, "lj_differentiation.png"))

    train_params0 = system.model.init(jax.random.PRNGKey(42), None, system.positions0, system.box)
    training = None
    if train_iters > 0:
        print("training with the Boltzmann estimator", flush=True)
        _, train = train_boltzmann(
            system, train_params0, R0s[: defaults["n_rep"]], g_target, n_iters=train_iters,
            steps_per_iter=defaults["steps_per_iter"], sample_every=sample_every, lr=3e-3,
            n_eval_steps=defaults["n_eval"], seed=1,
        )  # fmt: skip
        if not args.no_plots:
            plot_training(
                system, np.asarray(g_target), train, os.path.join(args.out, "lj_training.png")
            )
        training = {
            "iterations": train_iters,
            "replicas": defaults["n_rep"],
            "steps_per_iteration": defaults["steps_per_iter"],
            "rdf_mae_before": rdf_mae(train["g_before"], g_target),
            "rdf_mae_after": rdf_mae(train["g_after"], g_target),
            "rdf_loss_before": float(rdf_loss(train["g_before"], g_target)),
            "rdf_loss_after": float(rdf_loss(train["g_after"], g_target)),
            "loss_first": train["losses"][0],
            "loss_last": train["losses"][-1],
            "train_time_s": train["train_time_s"],
        }
        print(
            f"RDF MAE before {training['rdf_mae_before']:.4f} -> after "
            f"{training['rdf_mae_after']:.4f}",
            flush=True,
        )

    out = {
        "description": "LJ fluid (32 particles, rho*=0.8, kT*=1, reduced units); gradient "
        "of the g(r) loss w.r.t. a pair-MLP correction on a repulsive prior",
        "settings": {
            "quick": bool(args.quick),
            "hidden_sizes": hidden,
            "seeds": seeds,
            "sample_every": sample_every,
            "dt_tau": DT,
            "cutoff_sigma": system.cutoff,
            "device": jax.devices()[0].device_kind,
            "time_limit_s": time_limit,
            "max_run_memory_gb": args.max_run_memory_gb,
            "estimator_batch_frames": ESTIMATOR_BATCH,
        },
        "methods": results,
        "training": training,
        "total_time_s": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "lj_differentiation.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}/lj_differentiation.json ({out['total_time_s']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
