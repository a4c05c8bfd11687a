"""Adam with coupled L2 against torch.optim.Adam's update, in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from face_jax.training import ParamGroup, adam_coupled_l2, grouped_adam


def _torch_adam(params, grads_fn, steps, lr, weight_decay):
  """torch.optim.Adam (amsgrad off) written out: decay joins the gradient."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  params = params.astype(np.float64)
  first = np.zeros_like(params)
  second = np.zeros_like(params)
  for step in range(1, steps + 1):
    grad = grads_fn(params) + weight_decay * params
    first = b1 * first + (1 - b1) * grad
    second = b2 * second + (1 - b2) * grad**2
    first_hat = first / (1 - b1**step)
    second_hat = second / (1 - b2**step)
    params = params - lr * first_hat / (np.sqrt(second_hat) + eps)
  return params


def _target(seed):
  return np.random.default_rng(seed).normal(size=(5, 3)).astype(np.float32)


def _run_optax(optimizer, params, target, steps):
  def loss(params):
    return 0.5 * jnp.sum((params["w"] - target) ** 2)

  state = optimizer.init(params)
  for _ in range(steps):
    grads = jax.grad(loss)(params)
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_adam_coupled_l2_matches_torch_adam_weight_decay():
  start = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  target = _target(1)
  lr, weight_decay, steps = 0.1, 0.3, 4
  got = _run_optax(
    adam_coupled_l2(lr, weight_decay), {"w": jnp.asarray(start)}, target, 4
  )["w"]
  expected = _torch_adam(start, lambda w: w - target, steps, lr, weight_decay)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # Decoupled decay (AdamW) lands elsewhere: the coupling is what is tested.
  adamw = _run_optax(
    optax.adamw(lr, weight_decay=weight_decay),
    {"w": jnp.asarray(start)},
    target,
    steps,
  )["w"]
  assert not np.allclose(adamw, expected, rtol=1e-3)


def test_grouped_adam_keeps_each_group_apart():
  start = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
  target = _target(3)
  params = {"face": jnp.asarray(start), "backbone": jnp.asarray(start)}
  optimizer = grouped_adam(
    {"face": ParamGroup(1e-1), "backbone": ParamGroup(1e-2, 0.5)},
    {"face": "face", "backbone": "backbone"},
  )
  state = optimizer.init(params)

  def loss(params):
    return sum(0.5 * jnp.sum((w - target) ** 2) for w in params.values())

  for _ in range(3):
    updates, state = optimizer.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)

  def grad_fn(w):
    return w - target

  np.testing.assert_allclose(
    params["face"], _torch_adam(start, grad_fn, 3, 1e-1, 0.0), atol=1e-5
  )
  np.testing.assert_allclose(
    params["backbone"], _torch_adam(start, grad_fn, 3, 1e-2, 0.5), atol=1e-5
  )
