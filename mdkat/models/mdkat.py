"""MDKAT: the assembled model (abstract: "modality-independent feature extraction, modality-specific
feature extraction, and multi-loss integration for decoupling").

    X_m --Projection--> P_m --shared encoder E_c--> C_m --CFF--> c                    (independent)
                        P_m --own encoder E_s^m--> S_m --AMSA--> s_m                  (specific)
                        P_m --score--> importance of each step, one per step for all modalities when aligned
    [c; s_text; s_audio; s_vision] --sigmoid gate--> MLP --> sentiment score
    [mean C_m; s_m] --unimodal head m--> p_m           (task loss, and KT's measure of strength)
    [C_m; S_m] --decoder m--> reconstruction of P_m    (decoupling losses with orthogonality)

The split into a shared encoder and per-modality encoders, the reconstruction and orthogonality terms
follow MISA and DMD; CFF, AMSA, KA and KT are described in their modules. The unimodal heads read the
pooled C_m before CFF, so that each one sees its own modality only. Switches (`model.mdkat.use_*`) remove a
module together with its parameters and its loss term; without decoupling each modality has one encoder
whose output serves as both C_m and S_m, and the reconstruction and orthogonality terms vanish.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mdkat import MODALITIES
from mdkat.config import PositiveFloat, Probability
from mdkat.data import Batch
from mdkat.models import losses
from mdkat.models.amsa import AdaptiveMaskedSelfAttention
from mdkat.models.base import Ablation, Model, ModelOutput, weighted_total
from mdkat.models.cff import CrossModalFusion
from mdkat.models.encoders import (
    Encoder,
    EncoderConfig,
    encode_all,
    masked_mean,
    projections,
    regression_head,
    valid_mask,
)
from mdkat.models.ka import KnowledgeAggregation
from mdkat.models.kt import KnowledgeTransfer


class MdkatConfig(EncoderConfig):
    """`model.mdkat`: the encoders, the modules' hyper-parameters, and a switch per module (ablations)."""

    amsa_threshold: Probability  # AMSA masks keys below this fraction of the sample's top importance
    ka_temperature: PositiveFloat
    kt_temperature: PositiveFloat
    kt_momentum: Probability
    use_cff: bool
    use_amsa: bool
    use_ka: bool
    use_kt: bool
    use_decoupling: bool


class MDKAT(Model):
    """Multimodal decoupling with knowledge aggregation and transfer."""

    Config = MdkatConfig
    LABEL = "MDKAT (all modules)"
    WEIGHTED_TERMS = ("unimodal", "rec", "orth", "ka", "kt")
    ABLATIONS = {
        "no_cff": Ablation("w/o CFF", {"use_cff": False}),
        "no_amsa": Ablation("w/o AMSA", {"use_amsa": False}),
        "no_ka": Ablation("w/o KA", {"use_ka": False}),
        "no_kt": Ablation("w/o KT", {"use_kt": False}),
        "no_decoupling": Ablation("w/o decoupling", {"use_decoupling": False}),
    }

    def __init__(
        self,
        cfg: MdkatConfig,
        dims: dict[str, int],
        aligned: bool = False,
        sizes: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.cfg, self.aligned = cfg, aligned
        d, drop = cfg.width, cfg.dropout
        self.projection = projections(cfg, {m: dims[m] for m in MODALITIES})
        self.specific = nn.ModuleDict({m: Encoder(d, cfg.heads, cfg.layers, drop) for m in MODALITIES})
        if cfg.use_decoupling:
            self.shared = Encoder(d, cfg.heads, cfg.layers, drop)
            self.decoders = nn.ModuleDict({m: nn.Linear(2 * d, d) for m in MODALITIES})
        self.cff = CrossModalFusion(MODALITIES, d, cfg.heads, drop) if cfg.use_cff else None
        self.amsa = (
            nn.ModuleDict(
                {m: AdaptiveMaskedSelfAttention(d, cfg.heads, drop, cfg.amsa_threshold) for m in MODALITIES}
            )
            if cfg.use_amsa
            else None
        )
        self.ka = KnowledgeAggregation(d, cfg.ka_temperature) if cfg.use_ka else None
        self.kt = KnowledgeTransfer(MODALITIES, cfg.kt_temperature, cfg.kt_momentum) if cfg.use_kt else None
        self.unimodal_heads = nn.ModuleDict({m: regression_head(2 * d, d, drop) for m in MODALITIES})
        fused = (1 + len(MODALITIES)) * d
        self.gate = nn.Linear(fused, fused)
        self.head = regression_head(fused, d, drop)

    @property
    def decoupled(self) -> bool:
        """With `use_decoupling` off, one encoder per modality gives both C_m and S_m."""
        return self.cfg.use_decoupling

    @classmethod
    def loss_terms(cls, cfg: MdkatConfig) -> tuple[str, ...]:
        """Names of the loss terms this configuration computes (`task` first, weight 1)."""
        terms = ["task", "unimodal"]
        if cfg.use_decoupling:
            terms += ["rec", "orth"]
        if cfg.use_ka:
            terms.append("ka")
        if cfg.use_kt:
            terms.append("kt")
        return tuple(terms)

    def forward(self, batch: Batch) -> ModelOutput:
        mask = {m: valid_mask(batch.lengths(m), batch.features(m).shape[1]) for m in MODALITIES}  # (B, T_m)
        projected = {m: self.projection[m](batch.features(m), mask[m]) for m in MODALITIES}  # (B, T_m, d)
        specific = {m: self.specific[m](projected[m], mask[m]) for m in MODALITIES}  # S_m (B, T_m, d)
        independent = encode_all(self.shared, projected, mask) if self.cfg.use_decoupling else specific  # C_m

        pooled_independent = {m: masked_mean(independent[m], mask[m]) for m in MODALITIES}  # (B, d)
        if self.cff is not None:
            _, _, c = self.cff(independent, mask)  # (B, d)
        else:
            c = torch.stack(list(pooled_independent.values())).mean(0)

        importance: dict[str, Tensor] = {}
        if self.amsa is not None:
            logit = {m: self.amsa[m].logit(projected[m]) for m in MODALITIES}  # (B, T_m) each
            if self.aligned:  # one time axis: one importance per moment, from every modality (amsa.py)
                logit = dict.fromkeys(MODALITIES, torch.stack(list(logit.values())).sum(0))
            pooled_specific = {}
            for m in MODALITIES:
                _, pooled_specific[m], importance[m] = self.amsa[m](specific[m], mask[m], logit[m])
        else:
            pooled_specific = {m: masked_mean(specific[m], mask[m]) for m in MODALITIES}

        unimodal = {
            m: self.unimodal_heads[m](torch.cat([pooled_independent[m], pooled_specific[m]], -1)).squeeze(-1)
            for m in MODALITIES
        }
        x = torch.cat([c, *(pooled_specific[m] for m in MODALITIES)], dim=-1)  # (B, 4d)
        pred = self.head(torch.sigmoid(self.gate(x)) * x).squeeze(-1)  # (B,)

        reconstructed = (
            {m: self.decoders[m](torch.cat([independent[m], specific[m]], -1)) for m in MODALITIES}
            if self.cfg.use_decoupling
            else {}
        )
        if self.training and self.kt is not None:
            self.kt.update(unimodal, batch.label)
        return ModelOutput(
            pred=pred,
            mask=mask,
            unimodal=unimodal,
            independent=independent,
            specific=specific,
            pooled_independent=pooled_independent,
            pooled_specific=pooled_specific,
            projected=projected,
            reconstructed=reconstructed,
            importance=importance,
        )

    def loss(
        self, out: ModelOutput, batch: Batch, weights: Mapping[str, float]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and every term by name (detached), `task` with weight 1 and the others weighted."""
        label = batch.label
        terms = {"task": losses.l1(out.pred, label), "unimodal": losses.unimodal_l1(out.unimodal, label)}
        if self.cfg.use_decoupling:
            terms["rec"] = losses.reconstruction(out.reconstructed, out.projected, out.mask)
            terms["orth"] = losses.orthogonality(out.independent, out.specific, out.mask)
        if self.ka is not None:
            terms["ka"] = self.ka(out.pooled_independent, label)
        if self.kt is not None:
            terms["kt"] = self.kt(out.unimodal)
        total = weighted_total(terms, weights)
        return total, {name: value.detach() for name, value in terms.items()}
