"""The default model in torch: transformers' own Qwen3.5 trunk plus an MTP head to the published layout.

The head (weights `mtp.*` at the top level of the checkpoint, 15 tensors):

    e      = pre_fc_norm_embedding(embed_tokens(tok))     # Qwen3.5 RMSNorm: x_hat * (1 + w)
    h      = pre_fc_norm_hidden(hidden)
    z      = fc(cat([e, h], -1))                          # Linear 2H -> H, no bias
    z      = layers[0](z, positions)                      # one gated full-attention decoder layer
    g      = norm(z)
    logits = lm_head(g)                                   # shared with the trunk

Step 1 takes the trunk's hidden state after its final norm at position t and the token x[t+1], and
predicts x[t+2]. Step k >= 2 applies the same layer to (g of step k-1 at the same row, x[t+k]) and
predicts x[t+k+1]. Every step attends causally over its own rows, at positions 0..L-1.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

# The attention of the head relies on SDPA's `is_causal` path (no mask tensor): keep it SDPA.
ATTN_IMPLEMENTATION = "sdpa"


def build_config(
    vocab_size: int,
    hidden_size: int = 384,
    num_hidden_layers: int = 8,
    full_attention_interval: int = 4,
    num_attention_heads: int = 6,
    num_key_value_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int = 1024,
    linear_num_key_heads: int = 4,
    linear_num_value_heads: int = 8,
    linear_head_dim: int = 64,
    linear_conv_kernel_dim: int = 4,
    rope_theta: float = 100000.0,
    max_position_embeddings: int = 4096,
    eos_token_id: int = 0,
) -> Qwen3_5TextConfig:
    """A Qwen3.5 text config with tied embeddings and one MTP layer."""
    layer_types = [
        "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
        for i in range(num_hidden_layers)
    ]
    config = Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        linear_num_key_heads=linear_num_key_heads,
        linear_num_value_heads=linear_num_value_heads,
        linear_key_head_dim=linear_head_dim,
        linear_value_head_dim=linear_head_dim,
        linear_conv_kernel_dim=linear_conv_kernel_dim,
        layer_types=layer_types,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta,
            "partial_rotary_factor": 0.25,
        },
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        bos_token_id=None,
    )
    config.architectures = ["Qwen3_5ForCausalLM"]
    config.full_attention_interval = full_attention_interval  # what mlx-lm reads instead of layer_types
    config.mtp_num_hidden_layers = 1
    config.mtp_use_dedicated_embeddings = False
    return config


class MTPHead(nn.Module):
    """One Qwen3.5 MTP layer; `forward` is one step of the head and returns its post-norm output g."""

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        layer_config = copy.deepcopy(config)
        layer_config.num_hidden_layers = 1
        layer_config.layer_types = ["full_attention"]
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(hidden, eps=eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([Qwen3_5DecoderLayer(layer_config, layer_idx=0)])
        self.norm = Qwen3_5RMSNorm(hidden, eps=eps)
        for module in self.modules():  # the trunk's initialisation: N(0, 0.02), norms at 0 (scale 1)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.initializer_range)

    def forward(
        self, hidden: torch.Tensor, embeds: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        e = self.pre_fc_norm_embedding(embeds)
        h = self.pre_fc_norm_hidden(hidden)
        z = self.fc(torch.cat([e, h], dim=-1))
        z = self.layers[0](z, position_embeddings=position_embeddings, attention_mask=None)
        return self.norm(z)


class MTPModel(nn.Module):
    """Trunk (`Qwen3_5ForCausalLM`) and MTP head; `state_dict` keys are the exported names."""

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        config._attn_implementation = ATTN_IMPLEMENTATION
        self.config = config
        self.trunk = Qwen3_5ForCausalLM(config)
        self.mtp = MTPHead(config)

    def positions(self, x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin) for positions 0..length-1, the same for every step of the head."""
        # Qwen3.5's multimodal rotary takes (3, batch, length) ids; text uses one row for all three.
        position_ids = torch.arange(length, device=x.device).expand(3, 1, length)
        return self.trunk.model.rotary_emb(x, position_ids)

    def trunk_forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden after the final norm [B, L, H], logits [B, L, V]) of the trunk over `ids` [B, L]."""
        hidden = self.trunk.model(input_ids=ids).last_hidden_state
        return hidden, self.trunk.lm_head(hidden)

    def mtp_forward(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, position_embeddings=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One head step: (g [B, L, H], logits [B, L, V]) from hidden [B, L, H] and next_ids [B, L]."""
        if position_embeddings is None:
            position_embeddings = self.positions(hidden, hidden.shape[1])
        g = self.mtp(hidden, self.trunk.model.embed_tokens(next_ids), position_embeddings)
        return g, self.trunk.lm_head(g)

    def mtp_steps(self, hidden: torch.Tensor, tokens: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Logits of head steps 1..depth, teacher-forced.

        `hidden` [B, L, H] is the trunk's post-norm state over tokens[:, :L]; `tokens` [B, >= L + depth]
        holds the sequence, so step k reads tokens[:, k : k + L] and predicts tokens[:, k + 1 : k + 1 + L].
        """
        length = hidden.shape[1]
        position_embeddings = self.positions(hidden, length)
        logits = []
        for k in range(1, depth + 1):
            hidden, step_logits = self.mtp_forward(hidden, tokens[:, k : k + length], position_embeddings)
            logits.append(step_logits)
        return logits


def count_parameters(model: MTPModel) -> dict[str, int]:
    """Unique parameters (the tied lm_head counted once), split into trunk and head."""
    trunk = sum(p.numel() for p in model.trunk.parameters())  # parameters() already de-duplicates ties
    head = sum(p.numel() for p in model.mtp.parameters())
    return {"trunk": trunk, "mtp": head, "total": trunk + head}
