"""Adam with coupled L2, alone or per parameter group.

The authors train with `torch.optim.Adam(weight_decay=2 * reg_weight)`, which
adds weight_decay * param to the gradient before the moment estimates. That is
an L2 term in the loss, not AdamW's decoupled decay, so the decay here comes
before `scale_by_adam` in the chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optax


def adam_coupled_l2(
  learning_rate: float,
  weight_decay: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformation:
  """torch.optim.Adam with `weight_decay`, as an optax transformation.

  Args:
    learning_rate: step size.
    weight_decay: coefficient of the parameter added to the gradient before
      the moments (torch's weight_decay; 2 * reg_weight in the authors'
      configs).
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.

  Returns:
    The transformation.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.scale_by_learning_rate(learning_rate),
  )


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Hyperparameters of one parameter group (a torch param group).

  Attributes:
    learning_rate: Adam step size of the group.
    weight_decay: coupled L2 coefficient of the group.
  """

  learning_rate: float
  weight_decay: float = 0.0


def grouped_adam(
  groups: Mapping[str, ParamGroup],
  labels: Any | Callable[[Any], Any],
) -> optax.GradientTransformation:
  """Adam with coupled L2 and separate hyperparameters per parameter group.

  For example the FACE stages train the FACE module with lr 1e-3 and the
  backbone with lr 1e-4 and weight decay 2 * reg_weight:

    grouped_adam(
      {"face": ParamGroup(1e-3), "backbone": ParamGroup(1e-4, 2e-6)},
      lambda params: {"face": ..., "backbone": ...},  # label pytree
    )

  Each group keeps its own moments, as torch param groups do.

  Args:
    groups: group name -> its hyperparameters.
    labels: a pytree of group names with the structure of the params, or a
      function params -> such a pytree.

  Returns:
    The transformation.
  """
  transforms = {
    name: adam_coupled_l2(group.learning_rate, group.weight_decay)
    for name, group in groups.items()
  }
  return optax.multi_transform(transforms, labels)
