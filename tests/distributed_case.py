"""Process `<id>` of a 2-process `jax.distributed` StABlE epoch (tests/test_sharding.py).

`python tests/distributed_case.py OUT.npz PORT PROCESS_ID` with 2 forced host
devices per process: one simulation and one learning epoch with the 4 replicas
split over the 4 devices of both processes (CPU collectives: gloo), and the same
epochs on this process's first device alone; process 0 writes both parameter sets.
"""

import os
import sys

os.environ.setdefault("JAX_ENABLE_X64", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from stablejax import sharding  # noqa: E402


def main(out_path, port, process_id) -> None:
    sharding.initialize_distributed(
        "explicit",
        coordinator_address=f"localhost:{port}",
        num_processes=2,
        process_id=int(process_id),
    )
    import jax
    import numpy as np
    from test_stable_training import harmonic_bond_dataset, make_trainer, tiny_config

    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    data = harmonic_bond_dataset()
    config = tiny_config(max_epochs=2, upper_threshold=0.0, lower_threshold=-0.5, qm_weight=1.0)
    mesh = sharding.replica_mesh(0)
    both = make_trainer(config, data, None, mesh=mesh)
    p_both = sharding.to_host(both.run())
    assert both.state["learning_steps"] == 1
    assert both.runtime["n_processes"] == 2 and both.runtime["n_devices"] == 4
    alone = make_trainer(config, data, None)
    p_alone = sharding.to_host(alone.run())
    if jax.process_index() == 0:
        flat = {}
        for i, (a, b) in enumerate(
            zip(jax.tree.leaves(p_both), jax.tree.leaves(p_alone), strict=True)
        ):
            flat[f"both_{i}"], flat[f"alone_{i}"] = np.asarray(a), np.asarray(b)
        np.savez(out_path, **flat)


if __name__ == "__main__":
    main(*sys.argv[1:4])
