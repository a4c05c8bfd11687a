"""The train state and the one jitted train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

# (params, graph, batch, rng) -> {loss name: weighted scalar}; the training
# loss is the sum of the terms.
LossFn = Callable[[Any, Any, dict[str, jax.Array], jax.Array], dict]
# (state, batch, graph, rng) -> (state, {"loss": total, **terms}).
TrainStep = Callable[..., tuple["TrainState", dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a train step updates.

  Attributes:
    step: scalar int32, steps taken so far.
    params: the trained parameters.
    opt_state: the optimiser state of `params`.
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState

  @classmethod
  def create(
    cls, params: Any, optimizer: optax.GradientTransformation
  ) -> TrainState:
    """A state at step 0 with a fresh optimiser state."""
    # A strongly typed int32 step keeps the step's input and output types
    # identical, so the jitted step does not compile a second time.
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
    )


def make_train_step(
  loss_fn: LossFn, optimizer: optax.GradientTransformation
) -> TrainStep:
  """Builds `train_step(state, batch, graph, rng) -> (state, metrics)`.

  The step is jitted once with the state donated, so the parameters and
  moments are updated in place. The rng of a step is `fold_in(rng, step)`,
  so passing the same base rng every step gives every step its own stream
  and a resumed run the same streams as an uninterrupted one.

  Args:
    loss_fn: (params, graph, batch, rng) -> dict of weighted loss terms.
    optimizer: the optax transformation.

  Returns:
    The jitted step; `metrics` holds "loss" (the sum) and every term.
  """

  def train_step(state: TrainState, batch, graph, rng):
    step_rng = jax.random.fold_in(rng, state.step)

    def total_loss(params):
      terms = loss_fn(params, graph, batch, step_rng)
      return sum(terms.values()), terms

    (loss, terms), grads = jax.value_and_grad(total_loss, has_aux=True)(
      state.params
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
    )
    return new_state, {"loss": loss, **terms}

  return jax.jit(train_step, donate_argnums=0)
