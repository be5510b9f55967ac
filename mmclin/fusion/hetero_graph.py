"""Heterogeneous graph fusion with modality-prompted completion of missing modalities.

After Li et al., "GTP-4o: Modality-prompted Heterogeneous Graph Learning for Omni-modal
Biomedical Representation" (ECCV 2024). Each subject is a small torch-geometric
``HeteroData`` graph with two node types per modality ``m``: ``m`` (one node per real token)
and ``m@hub`` (one summary node per subject). Relations are typed, each with its own weights:

- intra-modality: ``(m, near, m)`` between tokens at most ``window`` positions apart in the
  modality's token order (self loops included), ``(m, member, m@hub)`` and
  ``(m@hub, context, m)`` between a modality's tokens and its hub, ``(m@hub, self, m@hub)``;
- inter-modality: ``(a@hub, inter, b@hub)`` for every ordered pair ``a != b``.

Aggregation is hierarchical, as in GTP-4o: ``n_layers`` heterogeneous graph transformer
layers (PyG ``HGTConv``: per-type keys/queries/values, per-relation attention and message
matrices and priors, one softmax over all incoming edges of a node) over the intra relations
only, then the hub of every modality the subject lacks is replaced by its prompted
completion, then ``n_layers`` ``HGTConv`` layers over the hub-to-hub relations. The readout
is the concatenation of the hubs. Subjects are disjoint graphs batched as one ``HeteroData``
(PyG's disjoint-union batching, built vectorised). Pure torch-geometric: no pyg-lib,
torch-scatter or torch-sparse.

``structure="set"`` keeps the former model as an ablation: complete graphs per subject
(intra edges with self loops, all inter edges), mean ``SAGEConv(root_weight=False)``, so
every node of a type receives the same message (a set model over per-modality means).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmclin.batch import FusionOutput, ModalityTokens
from mmclin.fusion.base import FusionHead
from mmclin.registry import FUSIONS

NEAR, MEMBER, CONTEXT, SELF, INTER = "near", "member", "context", "self", "inter"
INTRA = "intra"  # the set ablation's relation names
STRUCTURES = ("graph", "set")


def hub(m: str) -> str:
    """Node type of modality ``m``'s summary node."""
    return f"{m}@hub"


@FUSIONS.register("hetero_graph")
class HeteroGraphFusion(FusionHead):
    """GTP-4o-style heterogeneous token graph (HGT attention, intra- then inter-modality, prompted completion); unlike the paper, an absent modality is completed by one prompted hub node (not a generated sub-graph), modalities meet through hub nodes (no domain-knowledge meta-paths), and the graph is per subject (no population graph).

    ``x_v = proj_m(t_v) + e_m`` for each real token ``v`` of a present modality ``m``; hub
    ``h_m = q_m`` (learned). Stage 1: ``n_layers`` of ``x <- LN(HGT_intra(x))`` over the
    near / member / context / self relations. Completion for a modality the subject lacks:
    ``c_m = MLP_m(p_m + Attn(p_m, {x_v : v a stage-1 token of another present modality}))``,
    which replaces ``h_m``. Stage 2: ``n_layers`` of ``h <- LN(HGT_inter(h))`` over the hubs.
    ``pooled = W [h_m]_m``.

    In training, each *present* modality is also completed from the subject's other
    modalities and ``completion_weight * (1 - cos(c_m, stopgrad(h_m after stage 1)))`` is
    returned as ``aux_loss``: it teaches the completion what the real hub looks like, and is
    how its parameters learn in batches where nothing is missing.

    Args:
        input_dims: ``{modality: D_m}``. d_model: node width and output width (64).
        n_layers: layers per stage (2). n_heads: attention heads (4).
        window: intra-modality ``near`` edges join tokens at most this many positions apart (1).
        dropout: dropout on node features (0.1). completion_weight: weight of the
            completion loss (0.1; 0 disables it).
        completion: complete an absent modality from the present ones (True) or give it a
            zero node (False: the zero-filling ablation; no completion loss).
        structure: ``"graph"`` (the model above) or ``"set"`` (the complete-graph,
            mean-aggregation ablation described in the module docstring).

    Shapes:
        tokens[m].tokens: ``[B, T_m, D_m]``, mask ``[B, T_m]``; present[m]: ``[B]`` ->
        pooled ``[B, d_model]``; per_step[m]: ``[B, d_model]`` each modality's hub (graph)
        or mean node (set).
    """

    def __init__(self, input_dims: dict[str, int], d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 window: int = 1, dropout: float = 0.1, completion_weight: float = 0.1, completion: bool = True,
                 structure: str = "graph") -> None:
        super().__init__(input_dims)
        from torch_geometric.nn import HeteroConv, HGTConv, SAGEConv

        bad = [m for m in self.modalities if "__" in m or "@" in m]
        if bad:  # torch-geometric joins edge-type names with '__'; '@' names the hub node types
            raise ValueError(f"hetero_graph: modality names must not contain '__' or '@', got {bad}")
        if d_model % n_heads:
            raise ValueError(f"hetero_graph: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if structure not in STRUCTURES:
            raise ValueError(f"hetero_graph: option 'structure' must be one of {list(STRUCTURES)}, got {structure!r}")
        if not (isinstance(window, int) and window >= 0):
            raise ValueError(f"hetero_graph: option 'window' must be an integer >= 0, got {window!r}")
        if n_layers < 1:
            raise ValueError(f"hetero_graph: option 'n_layers' must be >= 1, got {n_layers}")
        self.output_dim = d_model
        self.d_model, self.window, self.structure = d_model, window, structure
        self.completion = bool(completion)
        self.completion_weight = completion_weight if self.completion else 0.0
        ms, M = self.modalities, len(self.modalities)
        self.project = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d_model))
                                      for m, d in self.input_dims.items()})
        self.type_embedding = nn.Parameter(torch.randn(M, d_model) * 0.02)
        if self.completion:
            # modality prompts: the query that gathers a missing modality from the present ones
            self.prompts = nn.Parameter(torch.randn(M, d_model) * 0.02)
            self.prompt_attention = nn.MultiheadAttention(d_model, n_heads, dropout=0.0, batch_first=True)
            self.complete = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                                            nn.Linear(d_model, d_model)) for m in ms})
        self.dropout = nn.Dropout(dropout)
        self.readout = nn.Linear(M * d_model, d_model)
        if structure == "set":
            self.edge_types = [(a, INTRA if a == b else INTER, b) for a in ms for b in ms]
            self.convs = nn.ModuleList(
                HeteroConv({et: SAGEConv(d_model, d_model, aggr="mean", root_weight=False) for et in self.edge_types},
                           aggr="sum")
                for _ in range(n_layers))
            self.norms = nn.ModuleList(nn.ModuleDict({m: nn.LayerNorm(d_model) for m in ms}) for _ in range(n_layers))
            return
        self.hub_query = nn.Parameter(torch.randn(M, d_model) * 0.02)
        self.intra_types = [et for m in ms for et in ((m, NEAR, m), (m, MEMBER, hub(m)), (hub(m), CONTEXT, m),
                                                      (hub(m), SELF, hub(m)))]
        self.inter_types = [(hub(a), INTER if a != b else SELF, hub(b)) for a in ms for b in ms]
        self.edge_types = self.intra_types + [et for et in self.inter_types if et[1] == INTER]
        token_and_hub = [t for m in ms for t in (m, hub(m))]
        hubs = [hub(m) for m in ms]
        self.intra = nn.ModuleList(HGTConv(d_model, d_model, (token_and_hub, self.intra_types), heads=n_heads)
                                   for _ in range(n_layers))
        self.intra_norms = nn.ModuleList(nn.ModuleDict({t: nn.LayerNorm(d_model) for t in token_and_hub})
                                         for _ in range(n_layers))
        # the hubs read the final token states (in stage 1 they see the previous layer's);
        # tokens are sources only here, so they get keys/values but no output weights
        self.pool_types = [et for m in ms for et in ((m, MEMBER, hub(m)), (hub(m), SELF, hub(m)))]
        self.pool = HGTConv({t: d_model for t in token_and_hub}, d_model, (hubs, self.pool_types), heads=n_heads)
        self.pool_norms = nn.ModuleDict({t: nn.LayerNorm(d_model) for t in hubs})
        self.inter = nn.ModuleList(HGTConv(d_model, d_model, (hubs, self.inter_types), heads=n_heads)
                                   for _ in range(n_layers))
        self.inter_norms = nn.ModuleList(nn.ModuleDict({t: nn.LayerNorm(d_model) for t in hubs})
                                         for _ in range(n_layers))

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

        ``structure="graph"``: node type ``m`` has ``x`` ``[N_m, d]`` (projected real tokens),
        ``batch`` and ``pos`` ``[N_m]`` (subject and token position of each node); ``m@hub``
        has ``x`` ``[B, d]`` (the learned hub query), ``batch`` and ``present`` ``[B]`` (the
        subject has a real token of ``m``; the others' hubs are completed after stage 1).
        ``structure="set"``: node type ``m`` holds the real tokens and, for a subject lacking
        ``m``, one completion (or zero) node, flagged by ``completed``. Also returns the
        completions ``[B, M, d]`` (set; ``None`` for graph, where they come after stage 1), the
        projected tokens ``[B, T_m, d]`` and the node masks ``[B, T_m]``.
        """
        from torch_geometric.data import HeteroData

        x, mask = self._nodes(tokens, present)
        if self.structure == "set":
            return self._set_graph(x, mask)
        data = HeteroData()
        B = next(iter(mask.values())).shape[0]
        device = self.hub_query.device
        arange = torch.arange(B, device=device)
        for j, m in enumerate(self.modalities):
            real = mask[m]
            T = real.shape[1]
            ids = torch.where(real, torch.cumsum(real.flatten().long(), 0).view_as(real) - 1, -1)
            data[m].x = x[m][real]
            data[m].batch = arange.unsqueeze(1).expand(B, T)[real]
            data[m].pos = torch.arange(T, device=device).expand(B, T)[real]
            data[hub(m)].x = self.hub_query[j].expand(B, -1)
            data[hub(m)].batch = arange
            data[hub(m)].present = real.any(1)
            # near: token at position i -> token at i + k, |k| <= window, both real (same subject)
            src, dst = [], []
            for k in range(-min(self.window, T - 1), min(self.window, T - 1) + 1):
                a, b = ids[:, max(0, -k):T - max(0, k)], ids[:, max(0, k):T - max(0, -k)]
                ok = (a >= 0) & (b >= 0)
                src.append(a[ok])
                dst.append(b[ok])
            data[m, NEAR, m].edge_index = torch.stack([torch.cat(src), torch.cat(dst)])
            member = torch.stack([torch.arange(data[m].x.shape[0], device=device), data[m].batch])
            data[m, MEMBER, hub(m)].edge_index = member
            data[hub(m), CONTEXT, m].edge_index = member.flip(0)
            data[hub(m), SELF, hub(m)].edge_index = torch.stack([arange, arange])
        for a, rel, b in self.inter_types:
            if rel == INTER:  # every subject has a hub of every modality (real or completed)
                data[a, rel, b].edge_index = torch.stack([arange, arange])
        return data, None, x, mask

    def _set_graph(self, x: dict[str, Tensor], mask: dict[str, Tensor]):
        from torch_geometric.data import HeteroData

        comp = self.completions(x, mask) if self.completion else None
        data = HeteroData()
        slots: dict[str, Tensor] = {}  # [B, S_m] node id of each slot, -1 for none
        for j, m in enumerate(self.modalities):
            has = mask[m].any(1)  # present with at least one real token
            real = mask[m]
            # absent subject: slot 0 holds its completion (or zero) node
            slot_valid = torch.cat([real[:, :1] | ~has.unsqueeze(1), real[:, 1:]], 1)
            fill = comp[:, j:j + 1] if comp is not None else torch.zeros_like(x[m][:, :1])
            feats = torch.where(has.view(-1, 1, 1), x[m], torch.cat([fill, x[m][:, 1:]], 1))
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
        if self.structure == "set":
            return self._propagate_set(data, comp, x, mask)
        return self.propagate(data)

    def propagate(self, data) -> FusionOutput:
        """Both stages and the readout on a graph from :meth:`build_graph` (``structure="graph"``);
        tests rewire its edges to show that the output depends on them."""
        ms = self.modalities
        h, stage1 = self.intra_modality(data)
        comp = self.complete_hubs(data, h) if self.completion else None
        hubs = {}
        for j, m in enumerate(ms):
            fill = comp[:, j] if comp is not None else torch.zeros_like(stage1[m])
            hubs[m] = torch.where(data[hub(m)].present.unsqueeze(-1), stage1[m], fill)
        per_modality = self.inter_modality(data, hubs)
        pooled = self.readout(torch.cat([per_modality[m] for m in ms], -1))
        aux = None
        if self.training and self.completion_weight > 0:
            real = torch.stack([data[hub(m)].present for m in ms], 1)
            aux = self._completion_loss(comp, torch.stack([stage1[m] for m in ms], 1), real)
        return FusionOutput(pooled=pooled, aux_loss=aux, per_step=per_modality)

    def intra_modality(self, data) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Stage 1: ``n_layers`` HGT layers within each modality, then the hubs read the final
        token states. Returns the node states ``{node type: [N, d]}`` and the hubs ``{m: [B, d]}``
        (a hub of a modality the subject lacks is meaningless until completed)."""
        h = {t: self.dropout(data[t].x) for t in data.node_types}
        edges = {et: data[et].edge_index for et in self.intra_types}
        for conv, norms in zip(self.intra, self.intra_norms):
            out = conv(h, edges)
            h = {t: norms[t](self.dropout(out[t])) for t in h}
        out = self.pool(h, {et: data[et].edge_index for et in self.pool_types})
        return h, {m: self.pool_norms[hub(m)](self.dropout(out[hub(m)])) for m in self.modalities}

    def complete_hubs(self, data, h: dict[str, Tensor]) -> Tensor:
        """Prompted completion of every modality's hub from the subject's other modalities'
        stage-1 token states ``h`` (see :meth:`completions`). Shapes: -> ``[B, M, d]``."""
        B = data[hub(self.modalities[0])].x.shape[0]
        dense, dmask = {}, {}
        for m in self.modalities:  # node states back to [B, T_m, d] for the prompt attention
            batch, pos = data[m].batch, data[m].pos
            T = int(pos.max()) + 1 if pos.numel() else 1
            dense[m] = h[m].new_zeros(B, T, self.d_model).index_put((batch, pos), h[m])
            dmask[m] = torch.zeros(B, T, dtype=torch.bool, device=h[m].device).index_put(
                (batch, pos), torch.ones_like(pos, dtype=torch.bool))
        return self.completions(dense, dmask)

    def inter_modality(self, data, hubs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage 2: ``n_layers`` HGT layers between the hubs ``{m: [B, d]}`` (real or completed)."""
        h = {hub(m): hubs[m] for m in self.modalities}
        edges = {et: data[et].edge_index for et in self.inter_types}
        for conv, norms in zip(self.inter, self.inter_norms):
            out = conv(h, edges)
            h = {t: norms[t](self.dropout(out[t])) for t in h}
        return {m: h[hub(m)] for m in self.modalities}

    def _propagate_set(self, data, comp: Tensor | None, x: dict[str, Tensor], mask: dict[str, Tensor]) -> FusionOutput:
        h = {m: self.dropout(data[m].x) for m in self.modalities}
        edges = {et: data[et].edge_index for et in self.edge_types}
        for conv, norms in zip(self.convs, self.norms):
            msg = conv(h, edges)
            h = {m: norms[m](h[m] + self.dropout(F.gelu(msg[m]))) for m in self.modalities}
        B = next(iter(mask.values())).shape[0]
        per_modality = {}
        for m in self.modalities:
            batch = data[m].batch
            total = torch.zeros(B, self.d_model, dtype=h[m].dtype, device=h[m].device).index_add_(0, batch, h[m])
            count = torch.zeros(B, dtype=h[m].dtype, device=h[m].device).index_add_(0, batch, torch.ones_like(batch, dtype=h[m].dtype))
            per_modality[m] = total / count.clamp_min(1.0).unsqueeze(-1)
        pooled = self.readout(torch.cat([per_modality[m] for m in self.modalities], -1))
        aux = None
        if self.training and self.completion_weight > 0:
            ms = self.modalities
            real = torch.stack([mask[m].any(1) for m in ms], 1)
            target = torch.stack([(x[m] * mask[m].unsqueeze(-1)).sum(1) / mask[m].sum(1, keepdim=True).clamp_min(1)
                                  for m in ms], 1)
            aux = self._completion_loss(comp, target, real)
        return FusionOutput(pooled=pooled, aux_loss=aux, per_step=per_modality)

    def _completion_loss(self, comp: Tensor, target: Tensor, real: Tensor) -> Tensor:
        """``weight * mean (1 - cos(c_m, stopgrad(target_m)))`` over present modalities of subjects
        that have another modality to complete them from. Shapes: comp, target ``[B, M, d]``;
        real ``[B, M]``."""
        use = real & (real.sum(1, keepdim=True) > 1)
        dist = 1.0 - F.cosine_similarity(comp, target.detach(), dim=-1)  # [B, M]
        # a batch with nothing to learn from gives an exact 0 tied to the graph (no NaN, no None/tensor switch)
        return self.completion_weight * (dist * use).sum() / use.sum().clamp_min(1)

    @classmethod
    def example_options(cls) -> dict:
        return {"d_model": 8, "n_heads": 2, "n_layers": 2}
