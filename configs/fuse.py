"""The fuse job: one HeteroFusion run (target LoRA + source LoRAs + replay data -> fused LoRA).

Every default below is the paper's shared training block (docs/algorithm.md §9), so a paper run only
fills in paths. Run it with::

    hfjax fuse --config hfjax:fuse \\
        --config.target.model_path=$MODEL_ROOT/llama-3.1-8b-instruct \\
        --config.target.adapter_path=$ADAPTER_ROOT/llama_instruct/NER_mit-movie_sft \\
        --config.sources=qwen_conll04=$ADAPTER_ROOT/Qwen2.5/UIE/RE_conll04 \\
        --config.data.data_root=$DATA_ROOT/uie_sample300 \\
        --config.data.datasets=mit-movie_sample300,RE_conll04_sample300

The fused adapter is written to ``<output_dir>/<task_name>/merged_lora/`` (the original's
layout). String fields may use ``${VAR}`` / ``$VAR`` (expanded from the environment by
``hfjax.config.load_config``; an unset variable is an error) and ``~``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """Returns the fuse job's config with the paper's defaults."""
    config = ml_collections.ConfigDict()

    # A free label for logs and reports (the original's `experiment_name`); not used in paths.
    config.experiment_name = ""
    # This task's name: the export goes to <output_dir>/<task_name>/merged_lora/.
    config.task_name = "heterofusion"
    # Root folder of this run; every task of a multi-task file writes below it.
    config.output_dir = "outputs"
    # The one seed everything derives from (data order, network init, RDM draws). The first
    # release was unseeded; its later release defaults to 42.
    config.seed = 42

    # The target: the base model that will carry the fused adapter, and its LoRA.
    config.target = ml_collections.ConfigDict()
    # Folder of the target base model (HF layout: config.json + safetensors shards).
    config.target.model_path = ""
    # PEFT folder of the target LoRA (adapter_config.json + adapter_model.safetensors/.bin).
    config.target.adapter_path = ""
    # Chat template of the replay data: "llama3" | "qwen" | "mistral" (LlamaFactory 0.9.2's),
    # or "auto" = from the base model's model_type (llama -> llama3, qwen2 -> qwen, mistral).
    config.target.template = "auto"
    # Multi-task chaining: the name of an earlier task of the same file whose export is this
    # task's target adapter ("" = none). Set by load_config; adapter_path then points at that
    # task's merged_lora/, which only exists once that task has run.
    config.target.from_task = ""

    # The source experts, in order (order fixes their token positions, docs/algorithm.md §2): a
    # tuple of ConfigDicts {name, adapter_path}, optionally with the fields of `source_defaults()`
    # (fused-projection splitting and head layout). On the command line either
    # "name=path,name=path" or "path,path" (names from the folder names), or a single one as
    # sources.0.adapter_path=... Sources are never run: any family's LoRA is accepted.
    config.sources = ()

    # The replay data (docs/algorithm.md §8): Alpaca-style JSON records, all tasks pooled and
    # shuffled.
    config.data = ml_collections.ConfigDict()
    # Folder that holds <name>.json (or .jsonl) for every dataset below.
    config.data.data_root = ""
    # Dataset names (file stems under data_root); on the command line "a,b,c".
    config.data.datasets = ()
    # Each dataset's role, parallel to datasets (the later release's type / ratio): "main"
    # (taken whole; main sets go first), "replay:all" (taken whole) or "replay:0.5" (int(0.5 x
    # all main records) of it, sampled without replacement from seed). At least one "main".
    # () = every dataset pooled whole, in the order listed. On the command line "main,replay:0.5".
    config.data.roles = ()
    # Maximum tokens per example (prompt + response, truncated as LlamaFactory's infer_seqlen).
    config.data.cutoff_len = 1024
    # Smallest padded sequence length: examples are padded up to power-of-two buckets from
    # here to cutoff_len, so that only a few shapes are ever compiled.
    config.data.min_bucket = 64

    # The transfer network (docs/algorithm.md §3-§5), one per (module type, rank) group.
    config.fusion = ml_collections.ConfigDict()
    # Rows per block token: LoRA factors are cut into blocks of block_size rows (the original
    # hard-codes 4096; its later release makes it a field).
    config.fusion.block_size = 4096
    # Width E of the encoder and of the attention.
    config.fusion.embed_dim = 1024
    # Attention heads (must divide embed_dim).
    config.fusion.num_heads = 8
    # Size of the learned positional table: the most block tokens one side may have.
    config.fusion.max_pos = 4096
    # Gate shift: gate = clip(relu(logits + mu_gate), 0, 1). A fixed constant, not learned.
    config.fusion.mu_gate = 0.1
    # Initial value of each group's learnable scale alpha in B' = B + alpha * dB.
    config.fusion.alpha_init = 0.3
    # Share of the tail-aligned layer pairs that transfer: a float in (0, 1] or "a/b".
    config.fusion.transfer_ratio = config_dict.FieldReference(1.0, field_type=object)
    # How target and source layers pair (docs/algorithm.md §11; the later release's
    # model.layer_alignment):
    # "tail" (the deepest layers meet: the method), "head" or "naive" (layer i with layer i,
    # from the bottom), "uniform" (the kept pairs spread evenly over both depths).
    config.fusion.layer_alignment = "tail"
    # Which target factors the networks patch (docs/algorithm.md §11; the later release's
    # training.update_mode): "b_only" (B' = B + alpha * dB, A kept: the method), "a_only"
    # (A' = A + alpha * dA, B kept) or "ab_joint" (both, with the group's one alpha).
    config.fusion.update_mode = "b_only"
    # The denoising gate: "svd" (SVD-guided sparse gate, the paper) or "open" (gate = 1, the
    # "w/o denoising" ablation).
    config.fusion.gate = "svd"
    # Ablation: replace every source tensor by zeros (does the gain come from the sources?).
    config.fusion.zero_sources = False
    # Source control (issue #13): "none" (the real sources), "zero" (every source token zero;
    # the same as zero_sources=True), "noise" (each source token replaced by Gaussian noise of
    # its L2 norm, seeded from seed), or "mismatch" (source tokens dealt out to other modules
    # by a seeded derangement). A fused run that does no better than its controls transferred
    # nothing from the sources. See hfjax.fusion.controls.
    config.fusion.source_control = "none"
    # Transfer networks are keyed by (group_name, module type, rank); a later task of the same
    # file with the same group_name continues training the earlier task's networks, as the
    # original's cache does (its `fusion_group_name`).
    config.fusion.group_name = "heterofusion_transfer"
    # Multi-task chaining: the earlier task whose trained networks initialise this task's
    # ("" = fresh init). Set by load_config from group_name; alphas always start at alpha_init.
    config.fusion.reuse_from = ""
    # Dtype of the fused modules' A and B in merged_lora/: "float32" (the original: whatever
    # the target's dtype) or "target" (the target adapter's stored dtype; a bfloat16 target
    # then rounds B + alpha*dB). Modules that are not fused keep their dtype either way.
    config.fusion.export_dtype = "float32"

    # The RDM regulariser (docs/algorithm.md §6), a sliced-Wasserstein pull of the embeddings
    # towards relu(N(mu_target, sigma_target)).
    config.rdm = ml_collections.ConfigDict()
    # Weight of the RDM term in loss = LM + lambda_reg * mean-over-groups RDM.
    config.rdm.lambda_reg = 0.005
    # Mean of the Gaussian reference sample.
    config.rdm.mu_target = 0.0
    # Standard deviation of the Gaussian reference sample.
    config.rdm.sigma_target = 1.0
    # Number of random unit projections per RDM evaluation.
    config.rdm.num_projections = 2048
    # Rectifier applied to embeddings and reference: "relu" (the code) or "prelu" (the paper).
    config.rdm.activation = "relu"
    # How the projected samples are sorted: "xla" (jnp.sort, fast on GPU), "host" (rank-match
    # on the host, exact and much faster on CPU), or "auto" (host on CPU, xla elsewhere).
    config.rdm.sort = "auto"

    # The optimisation (docs/algorithm.md §7): AdamW + linear warmup + cosine decay, no clipping.
    config.train = ml_collections.ConfigDict()
    # Passes over the pooled replay set.
    config.train.epochs = 3
    # Peak learning rate.
    config.train.lr = 5e-5
    # Warmup steps = int(warmup_ratio * total optimizer steps); the first update runs at lr 0.
    config.train.warmup_ratio = 0.05
    # AdamW decoupled weight decay (applied to the alphas too, as in the original).
    config.train.weight_decay = 0.01
    # AdamW first-moment decay.
    config.train.b1 = 0.9
    # AdamW second-moment decay.
    config.train.b2 = 0.999
    # AdamW epsilon.
    config.train.eps = 1e-8
    # Examples per micro-batch.
    config.train.batch_size = 1
    # Micro-batches per optimizer step.
    config.train.grad_accum = 8
    # Which micro-batches each optimizer update sums (hfjax.training.windows): "original" (the
    # first release: counted per epoch, an epoch's leftover rolls into the next epoch's first
    # update, every loss / grad_accum, the last leftover dropped, no update if fewer than
    # grad_accum per epoch) or "continuous" (consecutive windows of grad_accum over all
    # epochs' stream, each the mean of its micro-batches, at least one update).
    config.train.windows = "original"
    # Stop after this many optimizer steps (-1 = run all epochs); the schedule still spans
    # the full run, so a capped run is a prefix of the full one.
    config.train.max_steps = -1
    # Dtype of the frozen base model's weights ("bfloat16" as the original, or "float32").
    config.train.base_dtype = "bfloat16"
    # Log losses and alphas every this many optimizer steps.
    config.train.log_every = 1
    # Save a resumable checkpoint every this many optimizer steps.
    config.train.checkpoint_every = 50
    # Checkpoints kept on disk (older ones are deleted).
    config.train.keep_checkpoints = 2
    # Rematerialise the base model's decoder layers in the backward pass (less memory).
    config.train.remat = False
    # Hold the base model's layers stacked and run them as one lax.scan (compile time
    # independent of depth); False keeps a list of layers and an unrolled loop.
    config.train.scan_layers = True

    # Device mesh and sharding (logical axes in code, their mesh mapping here).
    config.mesh = ml_collections.ConfigDict()
    # Data-parallel mesh axis size (-1 = all devices not used by the other axes).
    config.mesh.data = -1
    # Fully-sharded (parameter-sharding) mesh axis size.
    config.mesh.fsdp = 1
    # Tensor-parallel mesh axis size.
    config.mesh.tensor = 1
    # Logical axis -> mesh axis (a name, a tuple of names, or None = replicated). Order matters:
    # for each array dimension the first rule whose mesh axes are still free wins (flax's
    # logical_axis_rules), and every logical name the code uses must have a rule
    # (hfjax.sharding checks). A dimension that does not divide by its mesh axes keeps only
    # the leading axes that divide it (down to replicated).
    config.mesh.rules = (
        ("batch", ("data", "fsdp")),  # activations: examples of a micro-batch (before embed)
        ("seq", None),  # activations: token positions
        ("vocab", "tensor"),  # embedding / lm_head rows and the logits' vocabulary
        ("embed", "fsdp"),  # the model's hidden size: FSDP for weights (activations take it
        # only when batch cannot use fsdp, e.g. the paper's batch of 1)
        ("q_heads", "tensor"),  # weights: query heads x head_dim (q_proj out, o_proj in)
        ("kv_heads", "tensor"),  # weights: key/value heads x head_dim
        ("heads", "tensor"),  # activations: query heads
        ("mlp", "tensor"),  # MLP intermediate size (weights and activations)
        ("norm", None),  # RMSNorm scales (small: replicated)
        ("head_dim", None),  # per-head width
        ("lora_r", None),  # LoRA rank: never sharded
        ("block", ("fsdp", "tensor")),  # networks: a token's block_size * r values (big dim)
        ("fusion_embed", None),  # networks: width E
        ("fusion_qkv", None),  # networks: attention projections' width
        ("fusion_mlp", None),  # networks: decoder hidden width
        ("fusion_gate_mlp", None),  # networks: the SVD gate's hidden width (E // 4)
        ("fusion_pos", None),  # networks: rows of the position table
        ("tokens", None),  # block tokens of a module's context
    )

    return config


def source_defaults() -> ml_collections.ConfigDict:
    """The fields of one entry of ``config.sources``, with their defaults.

    Only ``adapter_path`` must be given. The head-layout fields matter only for a source
    with a fused ``qkv_proj`` (Phi-3) whose rows are not three equal thirds (grouped-query
    attention); ``hfjax.sources.source_options`` reads them.
    """
    source = ml_collections.ConfigDict()
    # Display name in reports and logs ("" = derived from the adapter folder's name).
    source.name = ""
    # PEFT folder of the source LoRA (adapter_config.json + adapter_model.safetensors/.bin).
    source.adapter_path = ""
    # Split LoRAs on fused projections (Phi-3's qkv_proj / gate_up_proj) into exact LoRAs on
    # q/k/v_proj and gate/up_proj (shared A, B cut by rows) where the target adapts those
    # parts. False keeps them fused, and then they match nothing in a Llama-like target.
    source.split_fused = True
    # The source base model's config.json (or its folder), read only for the head layout
    # (num_attention_heads, num_key_value_heads, head_dim, hidden_size, intermediate_size);
    # "" = none. The source model's weights are never needed.
    source.config_path = ""
    # Attention heads of the source model (0 = unknown: from config_path, if given).
    source.num_heads = 0
    # Key/value heads of the source model (0 = unknown: from config_path, else num_heads).
    source.num_kv_heads = 0
    # Per-head width (0 = unknown: from config_path, else hidden // num_heads).
    source.head_dim = 0
    return source
