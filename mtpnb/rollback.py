"""Exact rollback of Gated DeltaNet state after a partially accepted verify.

Attention layers roll back by trimming their KV cache. A Gated DeltaNet layer holds a conv window
and a recurrent state that cannot be trimmed, so while it runs a verify it keeps a *tape*: its
state before the call (free: MLX arrays are immutable), the call's conv input, and what gives the
state after the call's first m steps (every step's state, or the call's inputs to run them again).
Keeping m of the T verified tokens then means

    conv_state = conv_input[:, m : m + kernel - 1]
    ssm_state  = the gated-delta update over the first m steps, from the state before the call

which is the state a fresh prefill of the committed tokens would have built. Nothing is replayed
when every token is kept (the common case at high acceptance). Where the recurrence runs step by step
anyway, a verify-sized call keeps every step's state, so a rollback replays nothing: mlx-lm's
`gated_delta_ops`, one step at a time with the same ops as its gated_delta_update (CUDA, and a CPU
without mtpnb's kernel). mtpnb's CPU kernel (mtpnb.cpu_kernels; plain decoding and prefill run it too,
so that all paths compute each step alike) runs the kept steps again, bitwise as the verify did: writing
every step's state out cost more than these replays. Metal runs mlx-lm's fused kernel and replays.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.gated_delta import _gated_delta_step_ops, compute_g, gated_delta_update, normalize_qk
from mlx_lm.models.qwen3_5 import GatedDeltaNet
from mlx_lm.models.qwen3_next import Qwen3NextGatedDeltaNet

from . import cpu_kernels


STEPWISE_MAX_TOKENS = 16  # calls up to this long (verifies) keep every step's state where it is free


def _stepwise() -> bool:
    return not (mx.default_device() == mx.gpu and mx.metal.is_available())


class RollbackArraysCache(ArraysCache):
    """ArraysCache of one Gated DeltaNet layer that can forget the tail of its last call."""

    def __init__(self):
        super().__init__(size=2)
        self.tape = None

    def rollback(self, keep: int) -> None:
        """Keep only the first `keep` tokens of the last call."""
        if self.tape is None:
            raise RuntimeError("nothing to roll back: the layer has not run since the last rollback")
        layer, steps, conv_input, state0, state_after = self.tape
        self.tape = None
        if keep == steps:
            return
        self[0] = mx.contiguous(conv_input[:, keep : keep + layer.conv_kernel_size - 1])
        self[1] = state0 if keep == 0 else state_after(keep)


class _Recording:
    """The shared __call__ of mlx-lm's Gated DeltaNets, leaving a tape in a RollbackArraysCache.

    Same computation as the parents' __call__ (single sequence, no padding, no sharding); the
    subclasses differ only in how the input projections are laid out (`_projections`)."""

    def __call__(self, inputs: mx.array, mask=None, cache=None) -> mx.array:
        recording = isinstance(cache, RollbackArraysCache)
        # Plain decoding and prefill take this path too where the CPU kernel runs the recurrence, so
        # that they and a verify compute every step alike (mtpnb.cpu_kernels); batched (masked) and
        # tensor-parallel (sharded) calls stay mlx-lm's.
        plain_here = (cache is not None and mask is None and getattr(cache, "lengths", None) is None
                      and getattr(self, "sharding_group", None) is None and _cpu_recurrence(inputs))
        if not recording and not plain_here:
            return super().__call__(inputs, mask, cache)
        B, S, _ = inputs.shape
        qkv, z, b, a = self._projections(inputs)

        conv_state = cache[0]
        if conv_state is None:
            conv_state = mx.zeros((B, self.conv_kernel_size - 1, self.conv_dim), dtype=inputs.dtype)
        conv_input = mx.concatenate([conv_state, qkv], axis=1)
        cache[0] = mx.contiguous(conv_input[:, -(self.conv_kernel_size - 1) :])
        conv_out = nn.silu(self.conv1d(conv_input))
        q, k, v = [
            t.reshape(B, S, h, d)
            for t, h, d in zip(
                mx.split(conv_out, [self.key_dim, 2 * self.key_dim], -1),
                [self.num_k_heads, self.num_k_heads, self.num_v_heads],
                [self.head_k_dim, self.head_k_dim, self.head_v_dim],
            )
        ]
        q, k = normalize_qk(q, k, inv_scale=self.head_k_dim**-0.5, eps=1e-6)
        state0 = cache[1]
        if state0 is None:
            state0 = mx.zeros((B, self.num_v_heads, self.head_v_dim, self.head_k_dim), dtype=mx.float32)
        out, cache[1], state_after = _recurrence(self, q, k, v, a, b, state0, recording)
        if recording:
            cache.tape = (self, S, conv_input, state0, state_after)
        else:
            cache.advance(S)
        out = self.norm(out, z)
        return self.out_proj(out.reshape(B, S, -1))


class RecordingGatedDeltaNet(_Recording, GatedDeltaNet):
    """Qwen3.5's Gated DeltaNet (separate q/k/v, z, b and a projections)."""

    def _projections(self, inputs):
        B, S, _ = inputs.shape
        z = self.in_proj_z(inputs).reshape(B, S, self.num_v_heads, self.head_v_dim)
        return self.in_proj_qkv(inputs), z, self.in_proj_b(inputs), self.in_proj_a(inputs)


class RecordingQwen3NextGatedDeltaNet(_Recording, Qwen3NextGatedDeltaNet):
    """Qwen3-Next's Gated DeltaNet (q/k/v/z and b/a fused per key head)."""

    def _projections(self, inputs):
        B, S, _ = inputs.shape
        q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(inputs), self.in_proj_ba(inputs))
        return mx.concatenate([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], axis=-1), z, b, a


def _cpu_recurrence(inputs: mx.array) -> bool:
    return inputs.dtype == mx.float32 and inputs.shape[0] == 1 and cpu_kernels.usable()


def _recurrence(layer, q, k, v, a, b, state0, recording: bool):
    """The layer's gated delta rule over T steps from state0: -> (y [B, T, Hv, Dv], last state,
    state_after), state_after(n) giving the state after the first n steps, as a rollback needs (only
    asked of a `recording` call). On the CPU, float32: mtpnb's kernel, which runs the n steps again.
    Else mlx-lm's gated_delta_update: its ops path (CPU, CUDA) step by step in a recording call of a
    verify's size, with the same ops in the same order, so the same numbers, keeping every step's
    state; otherwise (Metal's fused kernel returns the last state only; prefills) run again."""
    beta = mx.sigmoid(b)
    g = compute_g(layer.A_log, a, layer.dt_bias)
    rq, rk = q, k
    if (repeat := v.shape[-2] // q.shape[-2]) > 1:
        rq, rk = mx.repeat(q, repeat, -2), mx.repeat(k, repeat, -2)
    if cpu_kernels.gated_delta_applies(rq, v, g, state0):
        return cpu_kernels.gated_delta(rq, rk, v, g, beta, state0)
    if recording and q.shape[1] <= STEPWISE_MAX_TOKENS and _stepwise():
        ys, states, state = [], [], state0
        for t in range(q.shape[1]):
            y, state = _gated_delta_step_ops(rq[:, t], rk[:, t], v[:, t], g[:, t], beta[:, t], state)
            ys.append(y)
            states.append(state)
        return mx.stack(ys, axis=1), state, lambda n: states[n - 1]
    y, state = gated_delta_update(q, k, v, a, b, layer.A_log, layer.dt_bias, state0, use_kernel=not layer.training)
    return y, state, lambda n: _recurrence(layer, q[:, :n], k[:, :n], v[:, :n], a[:, :n], b[:, :n], state0, False)[1]


RECORDING = {GatedDeltaNet: RecordingGatedDeltaNet, Qwen3NextGatedDeltaNet: RecordingQwen3NextGatedDeltaNet}


def install(model: nn.Module) -> bool:
    """Make every Gated DeltaNet (Qwen3.5, Qwen3-Next) of `model` record tapes; True if the model has any."""
    found = False
    for _, module in model.named_modules():
        if type(module) in RECORDING:
            module.__class__ = RECORDING[type(module)]
            found = True
    return found


def rollback_cache(cache: list, keep: int, discard: int) -> None:
    """Forget the last `discard` of the `keep + discard` tokens a trunk's caches just ran on
    (RollbackArraysCache replays the kept ones; the attention caches trim)."""
    for c in cache:
        if hasattr(c, "rollback"):
            c.rollback(keep)
        elif discard:
            c.trim(discard)
