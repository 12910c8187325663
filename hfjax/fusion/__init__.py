"""fusion: adapters in, ΔB out (docs/algorithm.md §2-6).

The pipeline, as the training loop uses it::

    plan = build_plan(target, sources, block_size=4096, transfer_ratio=1.0)  # topology
    print(plan.describe())                                     # pre-flight report
    plan.matches        # per source module: the target module it feeds, or why none
    ctx = build_contexts(plan, target, sources)                # numpy block tokens, once
    params = init_fusion_params(plan, ctx, key=key, embed_dim=1024, num_heads=8,
                                max_pos=4096, mu_gate=0.1, gate="svd", alpha_init=0.3)
    delta_B, aux = predict_delta_B(params, ctx, plan, embed_dim=1024, num_heads=8,
                                   max_pos=4096, mu_gate=0.1, gate="svd")
    new_B = fused_B(target_B, delta_B, params["alpha"], plan)  # B_t + alpha_g * ΔB
    # update_mode a_only / ab_joint (build_plan(..., update_mode=...)): ΔA too
    delta_A, delta_B, aux = predict_deltas(params, ctx, plan, embed_dim=1024, ...)
    new_A = fused_A(target_A, delta_A, params["alpha"], plan)  # A_t + alpha_g * ΔA
    reg = average_rdm(aux, rdm_key)                            # the RDM regulariser

``fusion`` never sees the model or the training loop.
"""

from hfjax.fusion.blocks import build_contexts, svd_descriptor, to_blocks
from hfjax.fusion.controls import SOURCE_CONTROLS, apply_source_control, source_control_of
from hfjax.fusion.matches import SourceMatch
from hfjax.fusion.network import (
    TransferNet,
    fused_A,
    fused_B,
    init_fusion_params,
    net_param_count,
    param_count,
    predict_delta_B,
    predict_deltas,
)
from hfjax.fusion.plan import (
    Bucket,
    FusionError,
    FusionPlan,
    Group,
    ModuleEntry,
    build_plan,
    parse_transfer_ratio,
)
from hfjax.fusion.probe import probe_markdown, probe_sources
from hfjax.fusion.rdm import average_rdm, rdm_loss
from hfjax.fusion.torch_compat import (
    from_torch_state_dict,
    params_to_torch_state_dict,
    reference_forward,
    torch_state_dict_to_params,
)

__all__ = [
    "Bucket",
    "FusionError",
    "FusionPlan",
    "Group",
    "ModuleEntry",
    "SOURCE_CONTROLS",
    "SourceMatch",
    "TransferNet",
    "apply_source_control",
    "average_rdm",
    "build_contexts",
    "build_plan",
    "from_torch_state_dict",
    "fused_A",
    "fused_B",
    "init_fusion_params",
    "net_param_count",
    "param_count",
    "params_to_torch_state_dict",
    "parse_transfer_ratio",
    "predict_delta_B",
    "predict_deltas",
    "probe_markdown",
    "probe_sources",
    "rdm_loss",
    "reference_forward",
    "source_control_of",
    "svd_descriptor",
    "to_blocks",
    "torch_state_dict_to_params",
]
