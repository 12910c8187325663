"""The paper's experiments (docs/algorithm.md §9), generated from a few functions.

    hfjax fuse --config hfjax:paper:single_source_qwen_to_llama/mit-movie
    python scripts/run_sweep.py 'sensitivity_alpha/*'

``list_experiments()`` names all 49; ``get_config(name)`` builds one. Every experiment is the
fuse job of ``configs/fuse.py`` (whose defaults are the paper's shared training block) with
paths and, for the sweeps, one hyperparameter filled in:

- ``single_source_qwen_to_llama/<uie task>`` (6): the Llama expert of that task + the 5
  other tasks' Qwen experts.
- ``multi_source_cross_family/llama_target_qwen_mistral`` (1): Llama mit-movie + Qwen
  NYT/conll04/TweetNER7 + Mistral FabNER/FindVehicle.
- ``multi_source_cross_family/qwen_target_llama_mistral`` (1): Qwen mit-movie + Llama
  TweetNER7/conll04/NYT + Mistral FabNER/FindVehicle.
- ``noise_robustness`` (1): Llama mit-movie + the 5 Qwen experts + 4 unrelated Llama NER
  experts (CrossNER science/politics, BC4CHEMD, BC2GM).
- ``glue_cross_family/{llama,qwen}/<glue task>`` (10): that family's expert of the task + the
  other family's mrpc/qnli/rte/sst2 experts; replay ``glue_merged``.
- ``sensitivity_alpha/<alpha>`` (18): single_source .../mit-movie, alpha_init 0.05 ... 0.9.
- ``sensitivity_mu_gate/<mu>`` (9): single_source .../mit-movie, mu_gate in MU_GATES.
- ``ablation/{no_denoising,no_rdm,zero_sources}`` (3): single_source .../mit-movie with one
  part switched off.

The UIE experiments replay the six UIE sets (6 x 300 examples).

The first 46 are the original release's YAML files one for one (same target, same sources in
the same order, same replay sets in the same order, same hyperparameters). The release ships
46 files, not the 49 that docs/algorithm.md §9 counts; the 3 ``ablation/*`` experiments make up the
difference with the method's own switches (``fusion.gate="open"`` is the paper's "w/o
denoising" row; ``rdm.lambda_reg=0`` and ``fusion.zero_sources`` isolate the regulariser and
the sources).

Paths come from the environment: ``MODEL_ROOT`` (default ``./models``), ``ADAPTER_ROOT``
(``./adapters``), ``DATA_ROOT`` (``./data``) and ``OUTPUT_ROOT`` (``./outputs``), read when a
config is built. Under them the original's own names are used, so an adapter tree prepared
for the original works unchanged: base models ``llama-3.1-8b-instruct`` and
``Qwen2.5-7B-Instruct``; adapters as in ``_ADAPTERS`` below (the original's irregular names,
e.g. ``llama_instruct/NER_mit-movie_sft``, ``Qwen2.5/UIE/NER_mit-movie``, ``mistral/ET_Fab/sft``,
``glue/llama3/cola_qa_train``). Replay data: ``$DATA_ROOT/uie_sample300/<name>.json`` for the
UIE sets and ``$DATA_ROOT/glue/glue_merged.json`` for GLUE. Each experiment writes to
``$OUTPUT_ROOT/paper/<name>/<task_name>/merged_lora/`` (``task_name`` as in the original:
``single_source_transfer``, ``alpha_sweep``, ...).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence

import ml_collections
from hfjax.configs import fuse

# The six UIE tasks: our short name -> the replay file stem (shared/data/README.md).
UIE_DATASETS = {
    "mit-movie": "mit-movie_sample300",
    "tweetner7": "TweetNER7_sample_15000_sample300",
    "conll04": "RE_conll04_sample300",
    "nyt": "RE_New-York-Times-RE_sample_30000_sample300",
    "findvehicle": "ET_FindVehicle_sample300",
    "fabner": "ET_FabNER_sample300",
}
# Replay order of every UIE experiment (the original lists TweetNER7 as "main", then the rest).
UIE_REPLAY = ("tweetner7", "findvehicle", "conll04", "nyt", "fabner", "mit-movie")
# Source order of the single-source experiments: this list minus the target task.
UIE_SOURCE_ORDER = ("nyt", "conll04", "tweetner7", "fabner", "findvehicle", "mit-movie")
GLUE_TASKS = ("cola", "mrpc", "qnli", "rte", "sst2")
# GLUE sources: the other family's experts for these tasks (cola has no source expert).
GLUE_SOURCE_TASKS = ("mrpc", "qnli", "rte", "sst2")
# The paper's sweeps.
ALPHAS = tuple(round(0.05 * k, 2) for k in range(1, 19))  # 0.05, 0.1, ..., 0.9
MU_GATES = (-0.05, -0.1, -0.15, -0.2, -0.3, -0.4, 0.05, 0.1, 0.15)
ABLATIONS = ("no_denoising", "no_rdm", "zero_sources")

# Base model folders under MODEL_ROOT, and the chat template each was trained with.
_BASE_MODELS = {"llama": "llama-3.1-8b-instruct", "qwen": "Qwen2.5-7B-Instruct"}
_TEMPLATES = {"llama": "llama3", "qwen": "qwen"}
# Adapter folders under ADAPTER_ROOT: (family, task) -> the original release's path.
_ADAPTERS = {
    ("llama", "mit-movie"): "llama_instruct/NER_mit-movie_sft",
    ("llama", "tweetner7"): "llama_instruct/NER_TweetNER7_sample_15000_sft",
    ("llama", "conll04"): "llama_instruct/RE_conll04",
    ("llama", "nyt"): "llama_instruct/RE_New-York-Times-RE_sample_30000_sft",
    ("llama", "findvehicle"): "llama_instruct/ET_FindVehicle_sft",
    ("llama", "fabner"): "llama_instruct/ET_FabNER_sft",
    ("llama", "crossner_science"): "llama_instruct/NER_CrossNER_science",
    ("llama", "crossner_politics"): "llama_instruct/NER_CrossNER_politics",
    ("llama", "bc4chemd"): "llama_instruct/NER_bc4chemd",
    ("llama", "bc2gm"): "llama_instruct/NER_bc2gm",
    ("qwen", "mit-movie"): "Qwen2.5/UIE/NER_mit-movie",
    ("qwen", "tweetner7"): "Qwen2.5/UIE/NER_TweetNER7_sample_15000",
    ("qwen", "conll04"): "Qwen2.5/UIE/RE_conll04",
    ("qwen", "nyt"): "Qwen2.5/UIE/RE_New-York-Times-RE_sample_30000",
    ("qwen", "findvehicle"): "Qwen2.5/UIE/ET_FindVehicle",
    ("qwen", "fabner"): "Qwen2.5/UIE/ET_FabNER",
    ("mistral", "findvehicle"): "mistral/ET_FindVehicle/sft",
    ("mistral", "fabner"): "mistral/ET_Fab/sft",
    **{("llama", f"glue_{t}"): f"glue/llama3/{t}_qa_train" for t in GLUE_TASKS},
    **{("qwen", f"glue_{t}"): f"glue/Qwen2.5/{t}_qa_train" for t in GLUE_TASKS},
}
# Noise experts of the robustness experiment: unrelated Llama NER adapters.
_NOISE_TASKS = ("crossner_science", "crossner_politics", "bc4chemd", "bc2gm")
_OTHER_FAMILY = {"llama": "qwen", "qwen": "llama"}


def _root(var: str, default: str) -> str:
    return os.environ.get(var) or default


def _adapter(family: str, task: str) -> str:
    return os.path.join(_root("ADAPTER_ROOT", "./adapters"), _ADAPTERS[family, task])


def _fusion(
    name: str,
    *,
    task_name: str,
    target: tuple[str, str],
    sources: Sequence[tuple[str, str]],
    datasets: Sequence[str],
    data_dir: str,
) -> ml_collections.ConfigDict:
    """The fuse job for one experiment: the shared block plus paths."""
    family, task = target
    config = fuse.get_config()
    config.experiment_name = "paper_" + name.split("/")[0]
    config.task_name = task_name
    config.output_dir = os.path.join(_root("OUTPUT_ROOT", "./outputs"), "paper", name)
    config.target.model_path = os.path.join(_root("MODEL_ROOT", "./models"), _BASE_MODELS[family])
    config.target.adapter_path = _adapter(family, task)
    config.target.template = _TEMPLATES[family]
    config.sources = tuple(
        ml_collections.ConfigDict({"name": f"{fam}_{t}", "adapter_path": _adapter(fam, t)})
        for fam, t in sources
    )
    config.data.data_root = os.path.join(_root("DATA_ROOT", "./data"), data_dir)
    config.data.datasets = tuple(datasets)
    return config


def _uie(name: str, task_name: str, target_task: str, sources: Sequence[tuple[str, str]],
         target_family: str = "llama") -> ml_collections.ConfigDict:
    """A UIE experiment: replay = the six UIE sets."""
    return _fusion(
        name,
        task_name=task_name,
        target=(target_family, target_task),
        sources=sources,
        datasets=[UIE_DATASETS[t] for t in UIE_REPLAY],
        data_dir="uie_sample300",
    )


def single_source(task: str, *, name: str | None = None,
                  task_name: str = "single_source_transfer") -> ml_collections.ConfigDict:
    """Qwen -> Llama: the Llama expert of ``task`` fused with the 5 other tasks' Qwen experts."""
    sources = [("qwen", t) for t in UIE_SOURCE_ORDER if t != task]
    return _uie(name or f"single_source_qwen_to_llama/{task}", task_name, task, sources)


def multi_source(target_family: str) -> ml_collections.ConfigDict:
    """mit-movie target, three experts of the other family + two Mistral experts."""
    other = _OTHER_FAMILY[target_family]
    other_tasks = {"llama": ("nyt", "conll04", "tweetner7"),  # sources for a Llama target
                   "qwen": ("tweetner7", "conll04", "nyt")}[target_family]
    sources = [(other, t) for t in other_tasks] + [("mistral", "fabner"),
                                                   ("mistral", "findvehicle")]
    name = f"multi_source_cross_family/{target_family}_target_{other}_mistral"
    return _uie(name, "multi_source_transfer", "mit-movie", sources, target_family)


def noise_robustness() -> ml_collections.ConfigDict:
    """The mit-movie single-source run with four unrelated Llama experts added as sources."""
    sources = [("qwen", t) for t in UIE_SOURCE_ORDER if t != "mit-movie"]
    sources += [("llama", t) for t in _NOISE_TASKS]
    return _uie("noise_robustness", "noise_robustness", "mit-movie", sources)


def glue(family: str, task: str) -> ml_collections.ConfigDict:
    """GLUE: ``family``'s expert of ``task`` fused with the other family's GLUE experts."""
    other = _OTHER_FAMILY[family]
    return _fusion(
        f"glue_cross_family/{family}/{task}",
        task_name="glue_transfer",
        target=(family, f"glue_{task}"),
        sources=[(other, f"glue_{t}") for t in GLUE_SOURCE_TASKS],
        datasets=["glue_merged"],
        data_dir="glue",
    )


def sensitivity_alpha(alpha: float) -> ml_collections.ConfigDict:
    """The mit-movie single-source run with ``fusion.alpha_init = alpha``."""
    config = single_source("mit-movie", name=f"sensitivity_alpha/{alpha:g}",
                           task_name="alpha_sweep")
    config.fusion.alpha_init = alpha
    return config


def sensitivity_mu_gate(mu: float) -> ml_collections.ConfigDict:
    """The mit-movie single-source run (alpha 0.3) with ``fusion.mu_gate = mu``."""
    config = single_source("mit-movie", name=f"sensitivity_mu_gate/{mu:g}",
                           task_name="mu_gate_sweep")
    config.fusion.mu_gate = mu
    return config


def ablation(kind: str) -> ml_collections.ConfigDict:
    """The mit-movie single-source run with one component switched off."""
    config = single_source("mit-movie", name=f"ablation/{kind}", task_name="ablation")
    if kind == "no_denoising":
        config.fusion.gate = "open"
    elif kind == "no_rdm":
        config.rdm.lambda_reg = 0.0
    elif kind == "zero_sources":
        config.fusion.zero_sources = True
    else:
        raise ValueError(f"unknown ablation {kind!r}; one of {ABLATIONS}")
    return config


def _experiments() -> dict[str, Callable[[], ml_collections.ConfigDict]]:
    """Every experiment name -> a builder (built lazily, so env vars are read late)."""
    table: dict[str, Callable[[], ml_collections.ConfigDict]] = {}
    for task in UIE_DATASETS:
        table[f"single_source_qwen_to_llama/{task}"] = lambda t=task: single_source(t)
    for family in ("llama", "qwen"):
        other = _OTHER_FAMILY[family]
        name = f"multi_source_cross_family/{family}_target_{other}_mistral"
        table[name] = lambda f=family: multi_source(f)
    table["noise_robustness"] = noise_robustness
    for family in ("llama", "qwen"):
        for task in GLUE_TASKS:
            table[f"glue_cross_family/{family}/{task}"] = lambda f=family, t=task: glue(f, t)
    for alpha in ALPHAS:
        table[f"sensitivity_alpha/{alpha:g}"] = lambda a=alpha: sensitivity_alpha(a)
    for mu in MU_GATES:
        table[f"sensitivity_mu_gate/{mu:g}"] = lambda m=mu: sensitivity_mu_gate(m)
    for kind in ABLATIONS:
        table[f"ablation/{kind}"] = lambda k=kind: ablation(k)
    return table


def list_experiments() -> list[str]:
    """All experiment names, in the table's order."""
    return list(_experiments())


def get_config(name: str | None = None) -> ml_collections.ConfigDict:
    """The fuse config of experiment ``name`` (see ``list_experiments()``)."""
    table = _experiments()
    if name is None:
        raise ValueError("configs/paper.py needs an experiment name: hfjax:paper:<name> (or "
                         "configs/paper.py:<name>), e.g. single_source_qwen_to_llama/mit-movie")
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else " (see list_experiments())"
        raise ValueError(f"unknown paper experiment {name!r}{hint}")
    return table[name]()
