"""Property-based fuzz of adapter validation: whatever an uploader hands over, validation accepts a
well-formed adapter or raises ``AdapterRejected`` naming the problem; never another exception, a
hang, an allocation of a size the file only claims, an unpickling call, or a registry changed by a
refused registration.

The strict ``adapter_config.json`` model (``peft_config``), checked against PEFT's own reading
of an accepted config.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from concilium.errors import AdapterRejected
from concilium.registry.peft_config import LoraAdapterConfig, parse_config
from concilium.registry.safetensors_check import loads_strict
from concilium.registry.validate import ModelInfo
from tests.registry.fuzz.common import (
    CFG,
    DEEP,
    JSON_VALUES,
    MANY,
    ODD_NUMBERS,
    OFF_KEYS,
    TEXT,
    Raw,
    check_accepted_config,
    outcome,
    to_json,
)

PLAIN = ["q_proj", "v_proj", "up_proj", "self_attn.q_proj", "model.layers.0.self_attn.q_proj"]


ODD_NAMES = [
    "all-linear",
    ".*",
    "q_proj|v_proj",
    "(a+)+$",
    "(",
    "q.proj",
    "model.layers.0.self_attn.q.proj",
    "layers.0.self_attn.q_proj",
    "../../etc/passwd",
    "/etc/passwd",
    "C:\\x",
    "",
    "q_proj\x00",
]


NAMES = st.sampled_from(PLAIN + ODD_NAMES) | TEXT


NAME_LISTS = st.lists(NAMES, max_size=4) | st.lists(st.sampled_from(PLAIN), min_size=1, max_size=3)


RANKS = (
    st.integers(-2, 70)
    | st.sampled_from([2**31, 2**63, 2**64 + 1, 10**30, True, 4.0, "4", None])
    | ODD_NUMBERS.map(Raw)
)


INITS = [True, False, "gaussian", "pissa", "pissa_niter_4", "olora", "mica", "eva", "corda"]


INITS += ["loftq", "lora_ga", "orthogonal", "evil", "", 0, 1, None]


OFF = st.sampled_from([None, False, 0, "", [], {}, True, 1, ["x"], {"a": 1}, "yes", {"r": 2}])


CONFIG_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "peft_type": st.sampled_from(["LORA", "lora", "LoRA", "LOHA", "ADALORA", " LORA", "", 1, None]),
    "r": RANKS,
    "lora_alpha": st.integers(-5, 100) | st.floats() | st.sampled_from([True, "8", 10**400]),
    "target_modules": NAMES | NAME_LISTS | JSON_VALUES,
    "exclude_modules": st.none() | NAMES | NAME_LISTS,
    "layers_to_transform": st.none()
    | st.integers(-2, 3)
    | st.lists(st.integers(-1, 3), max_size=3)
    | st.sampled_from([["0"], True, 1.0]),
    "layers_pattern": st.none()
    | st.sampled_from(["layers", "layer", "h", "(", "(a+)+$", ".*", "", "lay.rs", "layers.0"])
    | st.lists(st.sampled_from(["layers", "(", "h"]), max_size=2),
    "rank_pattern": st.dictionaries(NAMES, RANKS, max_size=3),
    "alpha_pattern": st.dictionaries(NAMES, st.floats() | st.integers(-2, 20), max_size=3),
    "init_lora_weights": st.sampled_from(INITS),
    "task_type": st.sampled_from(["CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", "causal_lm", None]),
    "auto_mapping": st.sampled_from(
        [
            None,
            {"base_model_class": "Qwen2MoeForCausalLM", "parent_library": "transformers"},
            {"base_model_class": "system", "parent_library": "os"},
            {"base_model_class": "X", "parent_library": "transformers..x"},
            {"base_model_class": "a.b", "parent_library": "transformers"},
            {"base_model_class": "X"},
        ]
    )
    | JSON_VALUES,
    "auto_map": st.sampled_from([None, {"AutoModel": "evil.Model"}]) | JSON_VALUES,
    "bias": st.sampled_from(["none", "all", "lora_only", None]),
    "megatron_core": st.sampled_from(["megatron.core", None, "os", ""]),
    "runtime_config": st.sampled_from([None, {}, {"ephemeral_gpu_offload": True}]) | JSON_VALUES,
    "lora_dropout": st.floats(-1, 2) | JSON_VALUES,
    "qalora_group_size": st.integers(-1, 64) | JSON_VALUES,
    "trust_remote_code": st.booleans(),
}


FLAG_KEYS = ["inference_mode", "fan_in_fan_out", "use_rslora", "ensure_weight_tying"]


OFF_KEYS += ["trainable_token_indices", "layer_replication", "megatron_config", "loftq_config"]


OFF_KEYS += ["eva_config", "corda_config", "use_qalora", "use_bdlora", "arrow_config"]


OFF_KEYS += ["alora_invocation_tokens", "kasa_config", "lora_ga_config", "monteclora_config"]


OFF_KEYS += ["velora_config"]


CONFIG_VALUES |= {k: st.booleans() | JSON_VALUES for k in FLAG_KEYS}


CONFIG_VALUES |= {k: OFF | JSON_VALUES for k in OFF_KEYS}


CONFIG_KEYS = sorted(set(CONFIG_VALUES) | set(LoraAdapterConfig.model_fields))


@st.composite
def mutated_configs(draw: st.DrawFn, good: dict[str, Any]) -> Any:
    cfg: Any = dict(good)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "drop", "unknown", "deep", "whole"]))
        key = draw(st.sampled_from(CONFIG_KEYS))
        if not isinstance(cfg, dict):
            break
        if kind == "set":
            cfg[key] = draw(CONFIG_VALUES.get(key, JSON_VALUES))
        elif kind == "drop":
            cfg.pop(key, None)
        elif kind == "unknown":
            cfg[draw(TEXT)] = draw(JSON_VALUES)
        elif kind == "deep":
            cfg[key] = draw(DEEP)
        else:
            cfg = draw(JSON_VALUES)
    return cfg


@MANY
@given(data=st.data(), max_rank=st.sampled_from([4, 64]))
def test_config_mutations(
    base: ModelInfo, good_config: dict[str, Any], data: st.DataObject, max_rank: int
) -> None:
    raw = data.draw(mutated_configs(good_config))
    text = to_json(raw).encode("utf-8", "surrogatepass")
    got = outcome(lambda: parse_config(loads_strict(CFG, text, "content"), base, max_rank))
    if isinstance(got, AdapterRejected):
        assert str(got).startswith(f"{CFG}: ")
        event("rejected")
        return
    event("accepted")
    check_accepted_config(json.loads(text), got, base, max_rank)


def test_good_config_is_accepted(base: ModelInfo, good_config: dict[str, Any]) -> None:
    """The fuzz's starting point passes, so accepted examples are checked, not just rejections."""
    plan = parse_config(good_config, base, 64)
    check_accepted_config(good_config, plan, base, 64)
