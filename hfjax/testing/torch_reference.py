"""A PyTorch model of the original HeteroFusion transfer network and RDM, written from
docs/algorithm.md §4
and §6: the reference the JAX port is checked against (parity tests, ``hfjax bench``).

The module layout (and so the ``state_dict`` keys) is the original's::

    encoder.input_norm, encoder.proj_row.0, encoder.proj_col.0, encoder.gate_net.{0,2},
    encoder.fusion_norm, pos_embed, attention.{q,k,v,out}_proj, decoder_layer.{0,2}

Inputs are batched: ``tgt_flat (B, n_t, bs*r)``, ``tgt_s (B, n_t, r)``, ``src_flat
(B, n_s, bs*r)``, ``src_s (B, n_s, r)``; every target token gets an output.
"""

from __future__ import annotations

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as e:  # torch is optional: hfjax[torch]
    raise ImportError("hfjax.testing.torch_reference needs torch: "
                      "pip install torch==2.13.0 'hfjax[torch]'") from e


class ConflictAwareBlockEncoder(nn.Module):
    """Per-token encoder: row view + column view, SVD-gated, LayerNorm'ed."""

    def __init__(self, block_size: int, rank: int, embed_dim: int, mu_gate: float) -> None:
        super().__init__()
        flat = block_size * rank
        self.block_size, self.rank, self.mu_gate = block_size, rank, mu_gate
        self.input_norm = nn.LayerNorm(flat, eps=1e-5)
        self.proj_row = nn.Sequential(nn.Linear(flat, embed_dim), nn.GELU())
        self.proj_col = nn.Sequential(nn.Linear(flat, embed_dim), nn.GELU())
        self.gate_net = nn.Sequential(nn.Linear(rank, embed_dim // 4), nn.ReLU(),
                                      nn.Linear(embed_dim // 4, embed_dim))
        self.fusion_norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x_flat: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b, n, _ = x_flat.shape
        x = self.input_norm(x_flat)
        rows = self.proj_row(x)
        x_cols = x.reshape(b, n, self.block_size, self.rank).transpose(-1, -2).reshape(b, n, -1)
        cols = self.proj_col(x_cols)
        gate = torch.clamp(F.relu(self.gate_net(s) + self.mu_gate), 0.0, 1.0)
        return self.fusion_norm((rows + cols) * gate)


class TopologyAlignedAttention(nn.Module):
    """Plain multi-head cross-attention returning head-averaged weights."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.h, self.d = num_heads, embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, q_in: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, nq, e = q_in.shape
        nk = kv.shape[1]
        q = self.q_proj(q_in).view(b, nq, self.h, self.d).transpose(1, 2)
        k = self.k_proj(kv).view(b, nk, self.h, self.d).transpose(1, 2)
        v = self.v_proj(kv).view(b, nk, self.h, self.d).transpose(1, 2)
        w = torch.softmax((q @ k.transpose(-1, -2)) * self.d ** -0.5, dim=-1)
        out = (w @ v).transpose(1, 2).reshape(b, nq, e)
        return self.out_proj(out), w.mean(dim=1)


class HeteroFusionTransferNet(nn.Module):
    """Encoder (shared by target and source), positions, cross-attention, decoder."""

    def __init__(self, rank: int, block_size: int, embed_dim: int, num_heads: int,
                 max_pos: int, mu_gate: float) -> None:
        super().__init__()
        self.rank, self.block_size = rank, block_size
        self.encoder = ConflictAwareBlockEncoder(block_size, rank, embed_dim, mu_gate)
        self.pos_embed = nn.Embedding(max_pos, embed_dim)
        self.attention = TopologyAlignedAttention(embed_dim, num_heads)
        self.decoder_layer = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(),
                                           nn.Linear(embed_dim, block_size * rank))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.decoder_layer[2].weight)
        nn.init.zeros_(self.decoder_layer[2].bias)

    def _with_pos(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.pos_embed(torch.arange(z.shape[1], device=z.device))[None]

    def forward(self, tgt_flat: torch.Tensor, tgt_s: torch.Tensor, src_flat: torch.Tensor,
                src_s: torch.Tensor):
        z_t = self.encoder(tgt_flat, tgt_s)
        z_s = self.encoder(src_flat, src_s)
        kv = self._with_pos(z_s)
        h, attn = self.attention(self._with_pos(z_t), kv)
        return self.decoder_layer(h), attn, z_t, z_s


def rdm_from_draws(z: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """docs/algorithm.md §6 with given draws: ``y`` the rectified sample, ``directions`` unit
    columns."""
    zr = F.relu(z.reshape(-1, z.shape[-1]))
    zs, _ = torch.sort(zr @ directions, dim=0)
    ys, _ = torch.sort(y @ directions, dim=0)
    return F.mse_loss(zs, ys)


def compute_rdm_reg(z: torch.Tensor, mu_target: float = 0.0, sigma: float = 1.0,
                    num_projections: int = 2048) -> torch.Tensor:
    """docs/algorithm.md §6 drawing its own sample and directions."""
    n, d = z.reshape(-1, z.shape[-1]).shape
    y = F.relu(torch.randn(n, d) * sigma + mu_target)
    directions = F.normalize(torch.randn(d, num_projections), p=2, dim=0)
    return rdm_from_draws(z, y, directions)
