"""Exact rollback of Gated DeltaNet state after a partially accepted verify.

Attention layers roll back by trimming their KV cache. A Gated DeltaNet layer holds a conv window
and a recurrent state that cannot be trimmed, so while it runs a verify it keeps a *tape*: its
state before the call (free: MLX arrays are immutable) and the call's post-conv q, k, v and raw
a, b. Keeping m of the T verified tokens then means

    conv_state = conv_input[:, m : m + kernel - 1]
    ssm_state  = the gated-delta update over the first m steps, from the state before the call

which is the state a fresh prefill of the committed tokens would have built. Nothing is replayed
when every token is kept (the common case at high acceptance).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk
from mlx_lm.models.qwen3_5 import GatedDeltaNet


class RollbackArraysCache(ArraysCache):
    """ArraysCache of one Gated DeltaNet layer that can forget the tail of its last call."""

    def __init__(self):
        super().__init__(size=2)
        self.tape = None

    def rollback(self, keep: int) -> None:
        """Keep only the first `keep` tokens of the last call."""
        if self.tape is None:
            raise RuntimeError("nothing to roll back: the layer has not run since the last rollback")
        layer, conv_input, q, k, v, a, b, state0 = self.tape
        self.tape = None
        if keep == q.shape[1]:
            return
        kernel = layer.conv_kernel_size
        self[0] = mx.contiguous(conv_input[:, keep : keep + kernel - 1])
        if keep == 0:
            self[1] = state0
        else:
            self[1] = gated_delta_update(
                q[:, :keep], k[:, :keep], v[:, :keep], a[:, :keep], b[:, :keep],
                layer.A_log, layer.dt_bias, state0, use_kernel=not layer.training,
            )[1]


class RecordingGatedDeltaNet(GatedDeltaNet):
    """mlx-lm's Qwen3.5 GatedDeltaNet that leaves a tape in a RollbackArraysCache.

    Same computation as the parent's __call__ (single sequence, no padding, no sharding)."""

    def __call__(self, inputs: mx.array, mask=None, cache=None) -> mx.array:
        if not isinstance(cache, RollbackArraysCache):
            return super().__call__(inputs, mask, cache)
        B, S, _ = inputs.shape
        qkv = self.in_proj_qkv(inputs)
        z = self.in_proj_z(inputs).reshape(B, S, self.num_v_heads, self.head_v_dim)
        b = self.in_proj_b(inputs)
        a = self.in_proj_a(inputs)

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
        out, cache[1] = gated_delta_update(
            q, k, v, a, b, self.A_log, self.dt_bias, state0, use_kernel=not self.training
        )
        cache.tape = (self, conv_input, q, k, v, a, b, state0)
        out = self.norm(out, z)
        return self.out_proj(out.reshape(B, S, -1))


def install(model: nn.Module) -> bool:
    """Make every Qwen3.5 Gated DeltaNet of `model` record tapes; True if the model has any."""
    found = False
    for _, module in model.named_modules():
        if type(module) is GatedDeltaNet:
            module.__class__ = RecordingGatedDeltaNet
            found = True
    return found
