"""stablejax: StABlE Training of machine-learning force fields in JAX.

Stability-Aware Boltzmann Estimator training (Raja et al., arXiv 2402.13984):
replica-batched MD finds where a force field goes unstable, and the Boltzmann
estimator corrects it there by matching a reference observable.

Public API (re-exported by hand):
  boltzmann_grad, boltzmann_grad_local: the estimator (see `stablejax.estimator`).
  reweight_observable, neighbourhood_membership: reweighting and local neighbourhoods.
Subpackages: `stablejax.md` (replica-batched MD), `stablejax.potentials` (SchNet,
NequIP, GemNet-T, pair potentials), `stablejax.data` (readers, generators),
`stablejax.observables`, `stablejax.stability`, `stablejax.training` (QM
pre-training, the StABlE loop), `stablejax.evaluation`, `stablejax.units`.
"""

from stablejax.estimator import (
    BoltzmannAux,
    boltzmann_grad,
    boltzmann_grad_local,
    neighbourhood_membership,
    reweight_observable,
)

__version__ = "0.1.0"

__all__ = [
    "BoltzmannAux",
    "boltzmann_grad",
    "boltzmann_grad_local",
    "neighbourhood_membership",
    "reweight_observable",
]
