"""The train state and the one jitted train step.

On a device mesh, a `StepLayout` says where the step's arguments live:
the state by the logical axes of its parameters (optimiser moments follow
their parameters, counters are replicated), the batch by its own logical
axes ("batch" for the examples), the constants argument (graph, frozen
tables) replicated unless given shardings. A stage builds it like this:

    params_axes = functools.partial(
      parallel.logical_axes_by_path, table=PARAMS_AXES_TABLE
    )
    state = sharded_train_state(init, optimizer, init_rng, mesh, rules,
                                params_axes)        # born sharded
    layout = step_layout(mesh, rules, state, optimizer, params_axes,
                         batch_spec, batch_axes, constants_shardings)
    constants = layout.place(constants)             # once, not per step
    rng = parallel.place_global(rng, layout.replicated)
    step = compile_train_step(
      make_train_step(loss_fn, optimizer, layout), "map step", layout,
      state, batch_spec, constants, rng)

`compile_train_step` logs the step's per-device memory before training and
returns the compiled program, which then runs every step; it splits host
batches as the layout says (device arrays must already have its
shardings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from face_jax import parallel

# (params, graph, batch, rng) -> {loss name: weighted scalar}, or a pair
# (that dict, {stat name: scalar}); the training loss is the sum of the
# terms, the stats are only reported (no gradient flows from them).
LossFn = Callable[[Any, Any, dict[str, jax.Array], jax.Array], Any]
# (state, batch, graph, rng) -> (state, {"loss": total, **terms, **stats,
# "grad_norm": global gradient norm}).
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


# A pytree of logical axes (see face_jax.parallel), or a function from the
# abstract tree to one.
LogicalTree = Any


def state_logical_axes(
  state: TrainState,
  optimizer: optax.GradientTransformation,
  params_axes: LogicalTree,
) -> TrainState:
  """Logical axes of every leaf of a train state.

  An optimiser leaf is laid out like a parameter when its key path ends
  with that parameter's path and it has the parameter's shape (Adam's
  moments, also those of each group of `optax.multi_transform`, whose
  entries of other groups are masked); any other leaf (counts) is
  replicated.

  Args:
    state: a TrainState of arrays or `jax.ShapeDtypeStruct`s.
    optimizer: the transformation that made `state.opt_state`; unused,
      its state's key paths say everything.
    params_axes: logical axes of `state.params` (tree or function of it).

  Returns:
    A TrainState of logical axes: the step replicated, the params as
    given, the optimiser leaves as above.
  """
  del optimizer
  if callable(params_axes):
    params_axes = params_axes(state.params)
  axes_leaves = jax.tree.leaves(params_axes, is_leaf=parallel.is_logical_axes)
  params = jax.tree_util.tree_leaves_with_path(state.params)
  by_path = {
    tuple(path): (tuple(leaf.shape), axes)
    for (path, leaf), axes in zip(params, axes_leaves, strict=True)
  }

  def moment_axes(path, leaf):
    for start in range(len(path)):
      shape, axes = by_path.get(tuple(path[start:]), (None, None))
      if shape == tuple(leaf.shape):
        return axes
    return None

  opt_axes = jax.tree_util.tree_map_with_path(moment_axes, state.opt_state)
  return TrainState(step=(), params=params_axes, opt_state=opt_axes)


def sharded_train_state(
  init_params: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  rng: jax.Array,
  mesh: Mesh,
  rules: parallel.Rules,
  params_axes: LogicalTree,
  *args: Any,
) -> TrainState:
  """`TrainState.create(init_params(rng, *args), optimizer)`, born sharded.

  Shapes come from `jax.eval_shape`, shardings from the rules, and the init
  runs jitted with those out_shardings, so no device ever holds a whole
  sharded table or moment. Arrays that go into the params as they are (a
  restored backbone) are passed in `args`, not closed over, so that they
  stay arguments instead of becoming constants of the program.

  Args:
    init_params: (rng, *args) -> params.
    optimizer: the optax transformation.
    rng: PRNG key of the init.
    mesh: the device mesh.
    rules: logical-to-mesh rules.
    params_axes: logical axes of the params (tree or function of them).
    *args: further arguments of `init_params` (global arrays).

  Returns:
    The step-0 state on `mesh`.
  """

  def init(rng, *args):
    return TrainState.create(init_params(rng, *args), optimizer)

  shapes = jax.eval_shape(init, rng, *args)
  logical = state_logical_axes(shapes, optimizer, params_axes)
  shardings = parallel.tree_shardings(mesh, rules, logical, shapes)
  return jax.jit(init, out_shardings=shardings)(rng, *args)


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """Where a train step's arguments and results live on the mesh.

  Attributes:
    mesh: the device mesh.
    rules: logical-to-mesh rules; the step is traced under
      `use_mesh(mesh, rules)`, so the logical constraints of model code
      (and the vocabulary-sharded token search) follow them.
    state: a TrainState of NamedShardings, also the new state's layout.
    batch: NamedShardings of the batch, a tree like it (or one for all).
    graph: NamedShardings of the constants argument (graph, frozen
      tables), a tree like it or one for all of it; replicated by default.
  """

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  state: Any
  batch: Any
  graph: Any = None

  def __post_init__(self):
    if self.graph is None:
      object.__setattr__(self, "graph", self.replicated)

  @property
  def replicated(self) -> NamedSharding:
    """A whole copy on every device (rngs, metrics, small constants)."""
    return NamedSharding(self.mesh, PartitionSpec())

  def place(self, graph: Any) -> Any:
    """The constants argument on its devices, once.

    Every process passes the same value (`parallel.place_global`).
    """
    return parallel.place_global(graph, self.graph)

  def place_batch(self, batch: Any) -> Any:
    """A host batch as global arrays split as the layout says.

    Every process passes the same global batch (drawn from the same seed)
    and transfers only the slices its own devices hold, which is also
    what a multi-process job needs: jit refuses host arrays for inputs
    split across processes.
    """
    return parallel.place_global(batch, self.batch)


def step_layout(
  mesh: Mesh,
  rules: parallel.Rules,
  state: TrainState,
  optimizer: optax.GradientTransformation,
  params_axes: LogicalTree,
  batch: Any,
  batch_axes: LogicalTree,
  graph: Any = None,
) -> StepLayout:
  """The layout of a step from logical axes.

  Args:
    mesh: the device mesh.
    rules: logical-to-mesh rules.
    state: the train state (arrays or ShapeDtypeStructs).
    optimizer: the transformation of its opt_state.
    params_axes: logical axes of `state.params`.
    batch: one batch (arrays or ShapeDtypeStructs), for the shapes.
    batch_axes: its logical axes, e.g. {"user": ("batch",), ...}.
    graph: NamedShardings of the constants (tree or one for all); None
      replicates them.

  Returns:
    The StepLayout. A dimension that its mesh axes do not divide is
    replicated (logged once), see `face_jax.parallel.logical_to_spec`.
  """
  rules = tuple(tuple(rule) for rule in rules)
  logical = state_logical_axes(state, optimizer, params_axes)
  return StepLayout(
    mesh=mesh,
    rules=rules,
    state=parallel.tree_shardings(mesh, rules, logical, state),
    batch=parallel.tree_shardings(mesh, rules, batch_axes, batch),
    graph=graph,
  )


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """A train step compiled for a layout; host batches are placed first.

  Attributes:
    compiled: the `jax.stages.Compiled` program.
    layout: where its arguments live.
  """

  compiled: Any
  layout: StepLayout

  def __call__(self, state: TrainState, batch, graph, rng):
    return self.compiled(state, self.layout.place_batch(batch), graph, rng)


def compile_train_step(
  step: TrainStep,
  name: str,
  layout: StepLayout,
  state: TrainState,
  batch: Any,
  graph: Any,
  rng: jax.Array,
) -> CompiledStep:
  """Compiles a laid-out step ahead of time and logs its memory per device.

  Args:
    step: `make_train_step(..., layout)`.
    name: what the step is, for the log line ("pretrain step").
    layout: the layout it was made with.
    state: the train state (arrays or ShapeDtypeStructs).
    batch: one batch or its ShapeDtypeStructs.
    graph: the constants argument, placed by `layout.place`.
    rng: the base rng, replicated.

  Returns:
    The CompiledStep; it runs every step without compiling again.
  """
  compiled = parallel.compile_and_log(step, name, state, batch, graph, rng)
  return CompiledStep(compiled, layout)


def resolve_rng_impl(name: str, num_devices: int) -> str:
  """The PRNG implementation that config.face.rng_impl=`name` stands for.

  "auto" is Philox on one device, where it draws dropout masks and SimGCL
  noise about 3-10x faster than threefry on CPU, and threefry on several:
  Philox's multiply-high does not lower in a step partitioned over devices
  (jax 0.10), threefry does on every backend.
  """
  if name != "auto":
    return name
  return "philox4x32" if num_devices == 1 else "threefry2x32"


def make_train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  layout: StepLayout | None = None,
) -> TrainStep:
  """Builds `train_step(state, batch, graph, rng) -> (state, metrics)`.

  The step is jitted once with the state donated, so the parameters and
  moments are updated in place. The rng of a step is `fold_in(rng, step)`,
  so passing the same base rng every step gives every step its own stream
  and a resumed run the same streams as an uninterrupted one.

  With a `layout`, the step is jitted with its in/out shardings (the new
  state keeps the state's layout, the rng and metrics are replicated) and
  traced under `use_mesh(layout.mesh, layout.rules)`. Compile it with
  `face_jax.parallel.compile_and_log` to log its memory per device.

  Args:
    loss_fn: (params, graph, batch, rng) -> dict of weighted loss terms,
      or (that dict, dict of reported statistics).
    optimizer: the optax transformation.
    layout: where the arguments live; None leaves placement to JAX (one
      device).

  Returns:
    The jitted step; `metrics` holds "loss" (the sum), every term, every
    statistic and "grad_norm" (the global L2 norm of the gradient).
  """

  def train_step(state: TrainState, batch, graph, rng):
    step_rng = jax.random.fold_in(rng, state.step)

    def total_loss(params):
      out = loss_fn(params, graph, batch, step_rng)
      terms, stats = out if isinstance(out, tuple) else (out, {})
      return sum(terms.values()), (terms, stats)

    (loss, (terms, stats)), grads = jax.value_and_grad(
      total_loss, has_aux=True
    )(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
    )
    # The norm of the whole gradient, before the optimiser, for the logs.
    return new_state, {
      "loss": loss,
      **terms,
      **stats,
      "grad_norm": optax.tree.norm(grads),
    }

  if layout is None:
    return jax.jit(train_step, donate_argnums=0)

  def laid_out_step(state: TrainState, batch, graph, rng):
    with parallel.use_mesh(layout.mesh, layout.rules):
      return train_step(state, batch, graph, rng)

  return jax.jit(
    laid_out_step,
    in_shardings=(layout.state, layout.batch, layout.graph, layout.replicated),
    out_shardings=(layout.state, layout.replicated),
    donate_argnums=0,
  )
