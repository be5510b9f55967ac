"""Heterogeneous graph fusion with modality-prompted completion of missing modalities.

After Li et al., "GTP-4o: Modality-prompted Heterogeneous Graph Learning for Omni-modal
Biomedical Representation" (ECCV 2024). Each subject is a small torch-geometric
``HeteroData`` graph: node types are the modalities, a node is one real token of a present
modality, and a modality the subject lacks gets one *completion node* computed from the
modalities it has (a learned per-modality prompt attends over the present tokens), rather
than a zero vector. All nodes of one subject are connected (within a modality: ``intra``
edges with self loops; across modalities: ``inter`` edges); subjects are disjoint graphs,
batched as one ``HeteroData`` (PyG's disjoint-union batching, built vectorised here; it
equals ``Batch.from_data_list`` of the per-subject graphs). ``HeteroConv`` over ``SAGEConv``
does the message passing (pure torch-geometric: no pyg-lib, torch-scatter, torch-sparse).

Graph is per subject (no population graph): inference is inductive, one subject at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmclin.batch import FusionOutput, ModalityTokens
from mmclin.fusion.base import FusionHead
from mmclin.registry import FUSIONS

INTRA, INTER = "intra", "inter"


@FUSIONS.register("hetero_graph")
class HeteroGraphFusion(FusionHead):
    """Per-subject heterogeneous token graph, modality-prompted completion, HeteroConv layers.

    ``x_v = proj_m(t_v) + e_m`` for each real token ``v`` of a present modality ``m``;
    for an absent ``m``: ``c_m = MLP_m(q_m + Attn(q_m, {x_v : v in the subject's present tokens}))``;
    ``L`` layers of ``x <- LN(x + GELU(sum_{r} SAGE_r(x)))`` over the edge types ``r``; readout
    ``pooled = W [mean_{v in m} x_v]_m`` (every modality has a node, real or completed).

    In training, each *present* modality is also completed from the subject's other
    modalities and ``completion_weight * (1 - cos(c_m, stopgrad(mean_v x_v)))`` is returned
    as ``aux_loss``: this teaches the completion what a real node looks like, and is how its
    parameters learn in batches where nothing is missing.

    Args:
        input_dims: ``{modality: D_m}``. d_model: node width and output width (64).
        n_layers: message-passing layers (2). n_heads: heads of the prompt attention (4).
        dropout: dropout on node features (0.1). completion_weight: weight of the
            completion loss (0.1; 0 disables it).

    Shapes:
        tokens[m].tokens: ``[B, T_m, D_m]``, mask ``[B, T_m]``; present[m]: ``[B]`` ->
        pooled ``[B, d_model]``; per_step[m]: ``[B, d_model]`` each modality's node readout.
    """

    def __init__(self, input_dims: dict[str, int], d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 dropout: float = 0.1, completion_weight: float = 0.1) -> None:
        super().__init__(input_dims)
        from torch_geometric.nn import HeteroConv, SAGEConv

        bad = [m for m in self.modalities if "__" in m]
        if bad:  # torch-geometric joins edge-type names with '__'
            raise ValueError(f"hetero_graph: modality names must not contain '__', got {bad}")
        if d_model % n_heads:
            raise ValueError(f"hetero_graph: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.output_dim = d_model
        self.d_model, self.completion_weight = d_model, completion_weight
        M = len(self.modalities)
        self.project = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d_model))
                                      for m, d in self.input_dims.items()})
        self.type_embedding = nn.Parameter(torch.randn(M, d_model) * 0.02)
        # modality prompts: the query that gathers a missing modality from the present ones
        self.prompts = nn.Parameter(torch.randn(M, d_model) * 0.02)
        self.prompt_attention = nn.MultiheadAttention(d_model, n_heads, dropout=0.0, batch_first=True)
        self.complete = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                                        nn.Linear(d_model, d_model)) for m in self.modalities})
        self.edge_types = [(a, INTRA if a == b else INTER, b) for a in self.modalities for b in self.modalities]
        self.convs = nn.ModuleList(
            HeteroConv({et: SAGEConv(d_model, d_model, aggr="mean", root_weight=False) for et in self.edge_types},
                       aggr="sum")
            for _ in range(n_layers)
        )
        self.norms = nn.ModuleList(nn.ModuleDict({m: nn.LayerNorm(d_model) for m in self.modalities})
                                   for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.readout = nn.Linear(M * d_model, d_model)

    # --- pieces ---------------------------------------------------------------------------
    def _nodes(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Projected tokens ``[B, T_m, d]`` and their masks (real token of a present modality)."""
        x, mask = {}, {}
        for j, m in enumerate(self.modalities):
            t = tokens[m]
            x[m] = self.project[m](t.tokens) + self.type_embedding[j]
            mask[m] = t.mask & present[m].unsqueeze(1)
        return x, mask

    def completions(self, x: dict[str, Tensor], mask: dict[str, Tensor]) -> Tensor:
        """Completion of every modality from the subject's *other* modalities' tokens.

        Shapes:
            x[m]: ``[B, T_m, d]``, mask[m]: ``[B, T_m]`` -> ``[B, M, d]``; where a subject has no
            other token the attention part is zero and the prompt alone drives the MLP.
        """
        ms = self.modalities
        keys = torch.cat([x[m] for m in ms], 1)  # [B, sumT, d]
        valid = torch.cat([mask[m] for m in ms], 1)  # [B, sumT]
        owner = torch.cat([torch.full((x[m].shape[1],), j, device=keys.device) for j, m in enumerate(ms)])
        B, M = keys.shape[0], len(ms)
        # allowed[b, j, k]: token k is real and not of modality j itself
        allowed = valid.unsqueeze(1) & (owner.unsqueeze(0) != torch.arange(M, device=keys.device).unsqueeze(1)).unsqueeze(0)
        has_any = allowed.any(-1)  # [B, M]
        # fully masked rows would give NaN in the softmax: unmask them, zero their result below
        block = ~(allowed | ~has_any.unsqueeze(-1))
        queries = self.prompts.unsqueeze(0).expand(B, M, -1).to(keys.dtype)
        n_heads = self.prompt_attention.num_heads
        attn_mask = block.repeat_interleave(n_heads, 0)  # [B * heads, M, sumT], True = blocked
        gathered, _ = self.prompt_attention(queries, keys, keys, attn_mask=attn_mask, need_weights=False)
        gathered = torch.where(has_any.unsqueeze(-1), gathered, 0.0)
        h = queries + gathered
        return torch.stack([self.complete[m](h[:, j]) for j, m in enumerate(ms)], 1)

    def build_graph(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]):
        """The batch as one torch-geometric ``HeteroData`` (disjoint union of subject graphs).

        Node type ``m`` has ``x`` ``[N_m, d]``, ``batch`` ``[N_m]`` (subject of each node) and
        ``completed`` ``[N_m]`` (True for a prompted completion node). Also returns the
        completions ``[B, M, d]`` and the per-modality node masks ``[B, T_m]``.
        """
        from torch_geometric.data import HeteroData

        x, mask = self._nodes(tokens, present)
        comp = self.completions(x, mask)
        data = HeteroData()
        slots: dict[str, Tensor] = {}  # [B, S_m] node id of each slot, -1 for none
        for j, m in enumerate(self.modalities):
            has = mask[m].any(1)  # present with at least one real token
            real = mask[m]
            # absent subject: slot 0 holds its completion node
            slot_valid = torch.cat([real[:, :1] | ~has.unsqueeze(1), real[:, 1:]], 1)
            feats = torch.where(has.view(-1, 1, 1), x[m], torch.cat([comp[:, j:j + 1], x[m][:, 1:]], 1))
            ids = torch.cumsum(slot_valid.flatten().long(), 0).view_as(slot_valid) - 1
            slots[m] = torch.where(slot_valid, ids, -1)
            B, S = slot_valid.shape
            data[m].x = feats[slot_valid]
            data[m].batch = torch.arange(B, device=feats.device).unsqueeze(1).expand(B, S)[slot_valid]
            data[m].completed = (~has).unsqueeze(1).expand(B, S)[slot_valid]
        for a, rel, b in self.edge_types:
            sa, sb = slots[a], slots[b]
            pair = (sa.unsqueeze(2) >= 0) & (sb.unsqueeze(1) >= 0)  # [B, S_a, S_b], same subject only
            src = sa.unsqueeze(2).expand_as(pair)[pair]
            dst = sb.unsqueeze(1).expand_as(pair)[pair]
            data[a, rel, b].edge_index = torch.stack([src, dst])
        return data, comp, x, mask

    def forward(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> FusionOutput:
        data, comp, x, mask = self.build_graph(tokens, present)
        h = {m: self.dropout(data[m].x) for m in self.modalities}
        edges = {et: data[et].edge_index for et in self.edge_types}
        for conv, norms in zip(self.convs, self.norms):
            msg = conv(h, edges)
            h = {m: norms[m](h[m] + self.dropout(F.gelu(msg[m]))) for m in self.modalities}
        B = next(iter(present.values())).shape[0]
        per_modality = {}
        for m in self.modalities:
            batch = data[m].batch
            total = torch.zeros(B, self.d_model, dtype=h[m].dtype, device=h[m].device).index_add_(0, batch, h[m])
            count = torch.zeros(B, dtype=h[m].dtype, device=h[m].device).index_add_(0, batch, torch.ones_like(batch, dtype=h[m].dtype))
            per_modality[m] = total / count.clamp_min(1.0).unsqueeze(-1)
        pooled = self.readout(torch.cat([per_modality[m] for m in self.modalities], -1))
        aux = self._completion_loss(comp, x, mask) if self.training and self.completion_weight > 0 else None
        return FusionOutput(pooled=pooled, aux_loss=aux, per_step=per_modality)

    def _completion_loss(self, comp: Tensor, x: dict[str, Tensor], mask: dict[str, Tensor]) -> Tensor:
        """``weight * mean (1 - cos(c_m, stopgrad(mean real node of m)))`` over present modalities
        of subjects that have another modality to complete them from."""
        ms = self.modalities
        real = torch.stack([mask[m].any(1) for m in ms], 1)  # [B, M]
        target = torch.stack([(x[m] * mask[m].unsqueeze(-1)).sum(1) / mask[m].sum(1, keepdim=True).clamp_min(1)
                              for m in ms], 1).detach()
        n_present = real.sum(1, keepdim=True)
        use = real & (n_present > 1)
        dist = 1.0 - F.cosine_similarity(comp, target, dim=-1)  # [B, M]
        # a batch with nothing to learn from gives an exact 0 tied to the graph (no NaN, no None/tensor switch)
        return self.completion_weight * (dist * use).sum() / use.sum().clamp_min(1)

    @classmethod
    def example_options(cls) -> dict:
        return {"d_model": 8, "n_heads": 2, "n_layers": 2}
