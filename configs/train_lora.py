"""The train-lora job: one LoRA expert trained in JAX on Alpaca data, exported for PEFT.

The defaults are the paper's experts (docs/algorithm.md §9: r 8, 3 epochs at lr 1e-4, all linear
projections), trained with the replay pipeline's chat templates and truncation (docs/algorithm.md
§8).
Run it with::

    hfjax train-lora --config hfjax:train_lora \\
        --config.model_path=$MODEL_ROOT/llama-3.1-8b-instruct \\
        --config.data_root=$DATA_ROOT/uie_sample300 \\
        --config.datasets=mit-movie_sample300 \\
        --config.task_name=NER_mit-movie_sft

The adapter is written to ``<output_dir>/<task_name>/adapter/`` (a PEFT directory that
``PeftModel.from_pretrained`` loads); checkpoints, ``metrics.jsonl`` and
``train_report.json`` sit beside it, and the same command resumes an interrupted run.
String fields may use ``${VAR}`` / ``$VAR`` (expanded from the environment) and ``~``.
"""

from __future__ import annotations

import ml_collections

# Every projection a llama-like decoder layer has (PEFT's "all-linear"), from the family table.
from hfjax.models.families import ALL_LINEAR


def get_config() -> ml_collections.ConfigDict:
    """Returns the train-lora job's config with the paper's expert defaults."""
    config = ml_collections.ConfigDict()

    # Folder of the base model (HF layout: config.json + safetensors + tokenizer files).
    config.model_path = ""
    # Chat template of the training data: "llama3" | "qwen" | "mistral", or "auto" = from
    # the base model's model_type (llama -> llama3, qwen2 -> qwen, mistral -> mistral).
    config.template = "auto"
    # Folder that holds the datasets (<name>.json, or a LlamaFactory dataset_info.json).
    config.data_root = ""
    # Dataset names under data_root, pooled and shuffled each epoch; on the command line
    # "a,b,c".
    config.datasets = ()
    # Maximum tokens per example (prompt + response, truncated as LlamaFactory's
    # infer_seqlen).
    config.cutoff_len = 1024
    # Smallest padded sequence length: batches are padded up to power-of-two buckets from
    # here to cutoff_len, so that only a few shapes are ever compiled.
    config.min_bucket = 64
    # Root folder of the run's outputs.
    config.output_dir = "outputs"
    # This expert's name: everything is written below <output_dir>/<task_name>/.
    config.task_name = "lora"
    # The one seed everything derives from (LoRA A init, data order).
    config.seed = 42
    # Continue from an existing PEFT LoRA ("" = fresh PEFT init): its A, B, rank, alpha and
    # modules replace the lora section's (e.g. a target LoRA tuned further on replay data).
    config.init_adapter = ""

    # The adapter (PEFT LoRA semantics: delta_W = scale * B @ A, B starts at zero).
    config.lora = ml_collections.ConfigDict()
    # Rank r of every adapted projection.
    config.lora.r = 8
    # lora_alpha: the scale is alpha / r (or alpha / sqrt(r) with use_rslora).
    config.lora.alpha = 16.0
    # Projections to adapt, by name, in every layer (default: all linear ones); on the
    # command line "q_proj,v_proj".
    config.lora.target_modules = ALL_LINEAR
    # rsLoRA scaling (alpha / sqrt(r)) instead of alpha / r.
    config.lora.use_rslora = False
    # Dropout on the LoRA branch's input. Only 0 is implemented; any other value is refused.
    config.lora.dropout = 0.0

    # The optimisation: AdamW + linear warmup + cosine decay (as the fuse job), no clipping.
    config.train = ml_collections.ConfigDict()
    # Passes over the pooled training set.
    config.train.epochs = 3
    # Peak learning rate.
    config.train.lr = 1e-4
    # Warmup steps = int(warmup_ratio * total optimizer steps); the first update runs at lr 0.
    config.train.warmup_ratio = 0.05
    # AdamW decoupled weight decay on A and B.
    config.train.weight_decay = 0.0
    # Examples per micro-batch.
    config.train.batch_size = 1
    # Micro-batches per optimizer step (the step's loss is the mean of their mean losses).
    config.train.grad_accum = 8
    # Stop after this many optimizer steps (-1 = run all epochs); the schedule still spans
    # the full run, so a capped run is a prefix of the full one.
    config.train.max_steps = -1
    # Dtype of the frozen base model's weights ("bfloat16" or "float32"); A and B are
    # always trained in float32.
    config.train.base_dtype = "bfloat16"
    # Rematerialise the base model's decoder layers in the backward pass (less memory).
    config.train.remat = False
    # Save a resumable checkpoint every this many optimizer steps (and at the end).
    config.train.checkpoint_every = 100
    # Checkpoints kept on disk (older ones are deleted).
    config.train.keep_checkpoints = 2
    # Write a metrics.jsonl line every this many optimizer steps (losses averaged over them).
    config.train.log_every = 1

    return config
