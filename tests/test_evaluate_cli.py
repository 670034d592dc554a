"""`python -m stablejax.evaluate`: the evaluation stage alone, for any saved model.

The system is a six-atom carbon octahedron held together by Lennard-Jones pairs
(r_min = 1.4 Å, epsilon 1 eV: 12 bonds, three non-bonded diagonals at ~2 Å). The sane
model is that potential; the absurd one has sigma 0.05 Å, i.e. no forces at bond
lengths: its atoms fly apart at 500 K within a few tens of fs.
"""

import json
import os
import pathlib

import ase
import ase.io
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from stablejax import evaluate as check
from stablejax import stability
from stablejax.data import Dataset
from stablejax.potentials import factory
from stablejax.potentials import io as model_io
from stablejax.potentials.base import all_pairs_edges

R_MIN = 1.4  # Å, LJ minimum = octahedron edge


def _lj_config(sigma):
    c = factory.default_config("lennard_jones")
    c.sigma, c.epsilon, c.cutoff = sigma, 1.0, 5.0
    return c


def _save_lj(path, sigma):
    config = _lj_config(sigma)
    potential = factory.build(config)
    x = np.eye(3)
    params = potential.init(None, np.full(3, 6), x, None)
    model_io.save_model(path, config, params)
    return potential, params


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """(data file, sane model dir, absurd model dir) in a temporary folder."""
    root = tmp_path_factory.mktemp("check")
    sane_potential, sane_params = _save_lj(root / "sane", R_MIN / 2 ** (1 / 6))
    _save_lj(root / "tiny_sigma", 0.05)
    octahedron = R_MIN / np.sqrt(2) * np.concatenate([np.eye(3), -np.eye(3)])
    rng = np.random.default_rng(0)
    species = np.full(6, 6)
    edges = all_pairs_edges(6)
    frames = []
    for _ in range(6):
        x = octahedron + 0.02 * rng.normal(size=octahedron.shape)
        e, f = sane_potential.energy_and_forces(sane_params, species, jnp.asarray(x), edges)
        atoms = ase.Atoms(numbers=species, positions=x)
        atoms.calc = SinglePointCalculator(atoms, energy=float(e), forces=np.asarray(f))
        frames.append(atoms)
    data = root / "octahedron.extxyz"
    ase.io.write(data, frames, format="extxyz")
    return data, root / "sane", root / "tiny_sigma"


def test_two_models_are_judged_on_the_same_states_and_paired(system, tmp_path, capsys):
    data, sane, tiny = system
    out = tmp_path / "out"
    final = check.main(
        ["--model", str(sane), "--model", str(tiny), "--model", f"copy={sane}", "--data",
         str(data), "--replicas", "2", "--time-ps", "0.2", "--out", str(out),
         "--trajectory-frames", "4"]
    )  # fmt: skip
    on_disk = json.loads((out / "final_metrics.json").read_text())
    assert on_disk["sane"]["stable_times_ps"] == final["sane"]["stable_times_ps"]
    for name in ("sane", "tiny_sigma"):
        assert len(on_disk[name]["stable_times_ps"]) == 2
        for r in range(2):
            frames = ase.io.read(out / name / "traj" / f"replica_{r:03d}.extxyz", index=":")
            assert 1 <= len(frames) <= 4 and len(frames[0]) == 6
    # The sane model keeps its bonds; the one without forces at bond lengths breaks them.
    sane_m, tiny_m = on_disk["sane"], on_disk["tiny_sigma"]
    assert sane_m["n_unstable"] == 0 and sane_m["stable_times_ps"] == [0.2, 0.2]
    assert tiny_m["n_unstable"] == 2 and max(tiny_m["stable_times_ps"]) < 0.2
    assert tiny_m["by_criterion"]["bond_length_deviation"]["n_unstable"] == 2
    assert sane_m["force_mae_meV_per_A"] < 1e-3 < tiny_m["force_mae_meV_per_A"]
    # Each other model against the first, on the same initial states.
    assert set(on_disk["paired_tests"]) == {"tiny_sigma vs sane", "copy vs sane"}
    assert on_disk["copy"]["stable_times_ps"] == sane_m["stable_times_ps"]
    assert on_disk["paired_tests"]["copy vs sane"]["p_value"] == 1.0
    test = on_disk["paired_tests"]["tiny_sigma vs sane"]
    assert test["models"] == ["sane", "tiny_sigma"] and test["n"] == 2
    assert test["n_shorter"] == 2 and test["median_difference_ps"] < 0
    settings = on_disk["check_settings"]
    assert [(c["name"], c["threshold"]) for c in settings["criteria"]] == [
        ("bond_length_deviation", 0.5),
        ("min_nonbonded_distance", 0.8),
    ]
    assert settings["integrator"] == "langevin" and settings["temperature_K"] == 500.0
    assert len(settings["initial_frames"]) == 2
    report = (out / "report.md").read_text()
    assert "sane" in report and "tiny_sigma" in report and "Paired test" in report
    assert (out / "survival.png").exists() and (out / "log.txt").exists()
    printed = capsys.readouterr()
    assert "[eval tiny_sigma]" in printed.out and "paired test tiny_sigma vs sane" in printed.out
    # Library log records (orbax reading the params) go to log.txt, not the console.
    assert "Restoring checkpoint" in (out / "log.txt").read_text()
    assert "Restoring checkpoint" not in printed.err + printed.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{root}/missing"], "no such directory"),
        (["--model", "{root}"], "not a saved stablejax model"),
        (["--model", "{sane}", "--time-ps", "0"], "must be > 0"),
        (["--model", "{sane}", "--time-ps", "-1"], "must be > 0"),
        (["--model", "{sane}", "--criterion", "bond_breaking"], "invalid choice"),
        (["--model", "{sane}", "--criterion", "rdf_mae"], "needs periodic water"),
        (["--model", "{sane}", "--data", "{root}/none.xyz"], "no such file"),
    ],
)
def test_bad_input_exits_with_a_clear_message(system, tmp_path, capsys, args, message):
    data, sane, _ = system
    args = [a.format(root=data.parent, sane=sane) for a in args]
    if "--data" not in args:
        args += ["--data", str(data)]
    with pytest.raises(SystemExit) as exit_info:
        check.main(args + ["--out", str(tmp_path / "out"), "--quiet"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_follow_the_experiments_per_system():
    """Molecules: bond deviation 0.5 Å + non-bonded guard 0.8 Å, Langevin 500 K, 0.5 fs;
    water: RDF MAE 3.0 over min(10 ps, time/10) + intermolecular 1.2 Å, Nose-Hoover 300 K."""
    mol = Dataset(species=np.full(6, 6), positions=np.zeros((1, 6, 3)))
    s = check.resolve_settings(check.CheckSettings(time_ps=5.0), mol)
    assert (s.criterion, s.threshold, s.guard, s.guard_threshold) == (
        "bond_length_deviation",
        stability.BOND_DEVIATION_EVAL_THRESHOLD,
        "min_nonbonded_distance",
        stability.NONBONDED_CONTACT_THRESHOLD,
    )
    assert (s.integrator, s.temperature_K, s.dt_fs) == ("langevin", 500.0, 0.5)
    water = Dataset(
        species=np.array([8, 1, 1] * 2), positions=np.zeros((1, 6, 3)), box=np.full(3, 9.0),
        metadata={"temperature_K": 310.0},
    )  # fmt: skip
    for time_ps, window in ((2.0, 0.2), (1000.0, 10.0)):
        s = check.resolve_settings(check.CheckSettings(time_ps=time_ps), water)
        assert (s.criterion, s.threshold, s.rdf_window_ps) == ("rdf_mae", 3.0, window)
        assert (s.guard, s.guard_threshold) == ("min_intermolecular_distance", 1.2)
        assert (s.integrator, s.temperature_K, s.dt_fs) == ("nose_hoover", 310.0, 1.0)
    s = check.resolve_settings(check.CheckSettings(guard="", criterion="rdf_mae"), water)
    assert s.guard == "" and s.guard_threshold is None


def test_library_does_not_import_experiments():
    root = pathlib.Path(check.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "from experiments" not in text and "import experiments" not in text, path
    assert os.path.basename(check.__file__) == "evaluate.py"


def test_water_criteria_are_the_experiments_and_catch_interpenetration():
    """Water data: windowed RDF MAE (10 frames of 20 fs for a 2 ps run) and the minimum
    intermolecular distance; a frame with one molecule inside another crosses the latter."""
    n_side, spacing = 4, 3.1  # box 12.4 Å: RDFs to 6 Å need half a side >= 6 Å
    g = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    x = ((g[:, None] + 0.5) * spacing + water[None]).reshape(-1, 3)
    rng = np.random.default_rng(0)
    frames = x[None] + 0.03 * rng.normal(size=(4,) + x.shape)
    dataset = Dataset(
        species=np.tile([8, 1, 1], len(g)), positions=frames, box=np.full(3, n_side * spacing)
    )
    s = check.resolve_settings(check.CheckSettings(time_ps=2.0), dataset)
    criteria, reference, obs_settings = check.check_system(dataset, s)
    assert [(c.name, c.window_frames) for c in criteria] == [
        ("rdf_mae", 10),
        ("min_intermolecular_distance", 1),
    ]
    assert set(reference) == {"g_OO(r)", "g_OH(r)", "g_HH(r)"}
    assert obs_settings == stability.RDF_MAE_SETTINGS
    collapsed = frames[0].copy()
    collapsed[3:6] += (collapsed[0] + [1.0, 0.0, 0.0]) - collapsed[3]
    flags = criteria[1].criterion.is_unstable(jnp.asarray(np.stack([frames[0], collapsed])))
    assert np.asarray(flags).tolist() == [False, True]
