"""The fusion settings MultimodalLM took before fusions were classes: ``fusion: soft_prompt | cross_attention``
with ``xattn_every_n`` and ``xattn_gate_init``. Configs and checkpoints that record them still build the same model,
with a deprecation warning that says what to write instead."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_deprecation

from mmclin.errors import ConfigError
from mmclin.fusion.base import Fusion
from mmclin.fusion.cross_attention import CrossAttentionFusion
from mmclin.fusion.soft_prompt import SoftPromptFusion

LEGACY_NAMES = ("soft_prompt", "cross_attention")


def fusion_from_settings(fusion: Fusion | str | None, xattn_every_n: int | None = None,
                         xattn_gate_init: float | None = None) -> Fusion:
    """The fusion a MultimodalLM's settings name.

    Args:
        fusion: a :class:`Fusion`; None for :class:`SoftPromptFusion`; or, deprecated, ``"soft_prompt"`` or
            ``"cross_attention"``.
        xattn_every_n: deprecated, with ``"cross_attention"`` only: its ``every_n`` (default 1).
        xattn_gate_init: deprecated, with ``"cross_attention"`` only: its ``gate_init`` (default 0).

    Raises:
        ConfigError: an unknown name, or ``xattn_*`` settings beside a fusion given as a class.
    """
    if isinstance(fusion, str):
        if fusion not in LEGACY_NAMES:
            raise ConfigError(f"fusion {fusion!r}: name a Fusion class, e.g. mmclin.fusion.SoftPromptFusion or "
                              "mmclin.fusion.CrossAttentionFusion")
        if fusion == "soft_prompt":  # checkpoints of soft-prompt models record the unused xattn_* defaults too
            rank_zero_deprecation("fusion: 'soft_prompt' is deprecated; write `fusion: mmclin.fusion.SoftPromptFusion`"
                                  " (or leave fusion out: it is the default)")
            return SoftPromptFusion()
        every_n = 1 if xattn_every_n is None else xattn_every_n
        gate_init = 0.0 if xattn_gate_init is None else xattn_gate_init
        rank_zero_deprecation(
            "fusion: 'cross_attention' with xattn_every_n / xattn_gate_init is deprecated; write `fusion: {class_path: "
            f"mmclin.fusion.CrossAttentionFusion, init_args: {{every_n: {every_n}, gate_init: {gate_init}}}}}`")
        return CrossAttentionFusion(every_n=every_n, gate_init=gate_init)
    given = [k for k, v in (("xattn_every_n", xattn_every_n), ("xattn_gate_init", xattn_gate_init)) if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: settings of the deprecated fusion: 'cross_attention' only; give "
                          "CrossAttentionFusion's every_n / gate_init as the fusion's init_args instead")
    return SoftPromptFusion() if fusion is None else fusion
