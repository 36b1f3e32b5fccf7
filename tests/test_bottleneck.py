"""Bottleneck adapters (AdapterH / AdapterP / Parallel) as a peft method: formulas, peft API, families, bnb."""
import copy
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from packaging.specifiers import SpecifierSet
from tiny import FAMILIES
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from peft_ext import adapters, sibo
from peft_ext.errors import UsageError
from peft_ext.tuners import add_peft_type
from peft_ext.tuners.bottleneck import BottleneckConfig, BottleneckLayer, BottleneckModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250], [1, 8, 8, 64, 120, 200, 31, 2]])


def load(tiny_model_dir, family="llama", **kwargs):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), **kwargs)


def bottleneck(model, **settings):
    return get_peft_model(model, BottleneckConfig(task_type="CAUSAL_LM", **settings))


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def layer_named(model, suffix) -> torch.nn.Module:
    return next(m for name, m in model.named_modules() if name.endswith(suffix))


# --- the PeftType guard -------------------------------------------------------------------------------


def test_peft_type_bottleneck_is_a_real_member_of_peft_enum():
    """Fails loudly when a peft or Python upgrade breaks how we add BOTTLENECK to peft's closed enum."""
    member = PeftType.BOTTLENECK
    assert PeftType("BOTTLENECK") is member and PeftType["BOTTLENECK"] is member
    assert member in list(PeftType) and "BOTTLENECK" in PeftType.__members__
    assert member == "BOTTLENECK" and member.value == "BOTTLENECK" and hash(member) == hash("BOTTLENECK")
    assert isinstance(member, PeftType) and isinstance(member, str)
    assert copy.deepcopy(member) is member and pickle.loads(pickle.dumps(member)) is member
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is BottleneckConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is BottleneckModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "adapter_"
    # SIBO's LoRA registration
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] is sibo.SiboLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] is sibo.SiboLoraModel


def test_peft_version_is_in_the_pinned_range():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pin = next(line.split("#")[0].strip() for line in f if line.startswith("peft"))
    supported = SpecifierSet(pin.removeprefix("peft"))
    assert peft.__version__ in supported, (
        f"peft {peft.__version__} is outside {pin}: re-check peft_ext.tuners.add_peft_type and "
        "peft_ext.sibo._register_lora_booster against it, then move the pin"
    )


def test_add_peft_type_refuses_to_shadow_a_peft_member():
    with pytest.raises(RuntimeError, match="LORA"):
        add_peft_type("LORA")
    assert add_peft_type("BOTTLENECK") is PeftType.BOTTLENECK  # ours: idempotent


def test_config_round_trips_through_peft_config_from_pretrained(tmp_path):
    BottleneckConfig(bottleneck_size=16, scaling="learned", use_parallel_adapter=True).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is BottleneckConfig and config.peft_type is PeftType.BOTTLENECK
    assert (config.bottleneck_size, config.scaling, config.use_parallel_adapter) == (16, "learned", True)


# --- the three placements against the formulas -----------------------------------------------------------


def fix_weights(layer: BottleneckLayer, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    for weights in (layer.adapter_down[name].weight, layer.adapter_up[name].weight):
        weights.data = torch.randn(weights.shape, generator=g) * 0.3


def by_hand(x, down, up, s):
    return s * F.linear(torch.tanh(F.linear(x, down)), up)


@pytest.mark.parametrize("scaling", [2, 0.5, "learned"])
def test_placements_match_the_reference_formulas_on_linear(tiny_model_dir, scaling):
    model = bottleneck(load(tiny_model_dir), bottleneck_size=8, scaling=scaling)
    model.add_adapter("parallel", BottleneckConfig(bottleneck_size=8, scaling=scaling, use_parallel_adapter=True))
    x = torch.randn(2, 5, 32)
    s = 1.0 if scaling == "learned" else float(scaling)

    up = layer_named(model, "layers.0.mlp.up_proj")  # before W: y = W(x + s·A(x))
    fix_weights(up)
    W = up.base_layer.weight
    D, U = up.adapter_down["default"].weight, up.adapter_up["default"].weight
    torch.testing.assert_close(up(x), F.linear(x + by_hand(x, D, U, s), W), atol=1e-6, rtol=1e-6)

    down = layer_named(model, "layers.0.mlp.down_proj")  # after W: h = W(x); y = h + s·A(h)
    fix_weights(down)
    x64 = torch.randn(2, 5, 64)
    h = F.linear(x64, down.base_layer.weight)
    D, U = down.adapter_down["default"].weight, down.adapter_up["default"].weight
    assert D.shape == (8, 32) and U.shape == (32, 8)
    torch.testing.assert_close(down(x64), h + by_hand(h, D, U, s), atol=1e-6, rtol=1e-6)

    model.set_adapter("parallel")  # beside W: y = W(x) + s·A(x), with d_in → b → d_out
    up_parallel = layer_named(model, "layers.0.self_attn.q_proj")
    fix_weights(up_parallel, "parallel")
    D, U = up_parallel.adapter_down["parallel"].weight, up_parallel.adapter_up["parallel"].weight
    expected = F.linear(x, up_parallel.base_layer.weight) + by_hand(x, D, U, s)
    torch.testing.assert_close(up_parallel(x), expected, atol=1e-6, rtol=1e-6)


def test_gpt2_conv1d_placements_use_the_transposed_weight(tiny_model_dir):
    model = bottleneck(load(tiny_model_dir, "gpt2"), bottleneck_size=8)
    model.add_adapter("parallel", BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True))
    x = torch.randn(2, 5, 32)

    c_fc = layer_named(model, "h.0.mlp.c_fc")  # Conv1D: y = x·W + b with W of shape (in, out)
    fix_weights(c_fc)
    W, b = c_fc.base_layer.weight, c_fc.base_layer.bias
    D, U = c_fc.adapter_down["default"].weight, c_fc.adapter_up["default"].weight
    torch.testing.assert_close(c_fc(x), (x + by_hand(x, D, U, 1.0)) @ W + b, atol=1e-6, rtol=1e-6)

    model.set_adapter("parallel")
    c_attn = layer_named(model, "h.0.attn.c_attn")  # 32 -> 96
    fix_weights(c_attn, "parallel")
    D, U = c_attn.adapter_down["parallel"].weight, c_attn.adapter_up["parallel"].weight
    assert D.shape == (8, 32) and U.shape == (96, 8)
    expected = x @ c_attn.base_layer.weight + c_attn.base_layer.bias + by_hand(x, D, U, 1.0)
    torch.testing.assert_close(c_attn(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("parallel", [False, True])
def test_mam_adapter_init_starts_as_the_base_model(tiny_model_dir, family, parallel):
    base = logits(load(tiny_model_dir, family))
    model = bottleneck(load(tiny_model_dir, family), init_weights="mam_adapter", use_parallel_adapter=parallel)
    assert torch.equal(logits(model), base)


def test_bert_init_is_normal_with_std_002(tiny_model_dir):
    torch.manual_seed(0)
    model = bottleneck(load(tiny_model_dir))
    weights = torch.cat([p.flatten() for n, p in model.named_parameters() if "adapter_" in n])
    assert abs(weights.mean().item()) < 1e-3 and abs(weights.std().item() - 0.02) < 1e-3


def test_learned_scaling_is_a_trainable_saved_scalar(tiny_model_dir, tmp_path):
    model = bottleneck(load(tiny_model_dir), scaling="learned", bottleneck_size=8)
    scales = {n: p for n, p in model.named_parameters() if "adapter_scaling" in n}
    assert len(scales) == 6 and all(p.requires_grad and p.item() == 1.0 for p in scales.values())
    model(input_ids=IDS).logits.sum().backward()
    assert all(p.grad is not None for p in scales.values())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load(tiny_model_dir), tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)


def test_dropout_acts_in_training_only(tiny_model_dir):
    model = bottleneck(load(tiny_model_dir), adapter_dropout=0.5, bottleneck_size=8)
    model.train()
    assert not torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
    assert torch.equal(logits(model), logits(model))


@pytest.mark.parametrize("bias", ["none", "all", "adapter_only"])
def test_bias_options_choose_the_trainable_biases(tiny_model_dir, tmp_path, bias):
    model = bottleneck(load(tiny_model_dir, "gptj"), bias=bias, bottleneck_size=8)
    trainable_biases = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias"))
    all_biases = sorted(n for n, _ in model.named_parameters() if n.endswith(".bias"))
    adapted_biases = [n for n in all_biases if ".fc_in." in n or ".fc_out." in n]
    assert trainable_biases == {"none": [], "all": all_biases, "adapter_only": adapted_biases}[bias]
    model.save_pretrained(tmp_path)
    saved = PeftModel.from_pretrained(load(tiny_model_dir, "gptj"), tmp_path)
    assert len([k for k in saved.state_dict() if k.endswith(".bias")]) == len(all_biases)


def test_adapter_runs_in_fp32_and_returns_the_activation_dtype(tiny_model_dir):
    model = bottleneck(load(tiny_model_dir, dtype=torch.bfloat16), bottleneck_size=8)
    assert {p.dtype for n, p in model.named_parameters() if "adapter_" in n} == {torch.float32}
    up = layer_named(model, "layers.0.mlp.up_proj")
    assert up(torch.randn(2, 3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert logits(model).dtype == torch.bfloat16


# --- the peft API ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_and_reload_gives_identical_logits(tiny_model_dir, tmp_path, family):
    model = bottleneck(load(tiny_model_dir, family), bottleneck_size=8)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(load(tiny_model_dir, family), tmp_path)
    assert isinstance(reloaded.base_model, BottleneckModel)
    assert torch.equal(logits(reloaded), logits(model))


def test_saved_keys_follow_the_reference_layout(tiny_model_dir):
    model = bottleneck(load(tiny_model_dir), bottleneck_size=8)
    keys = set(peft.get_peft_model_state_dict(model))
    assert "base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight" in keys
    assert all(".adapter_down." in k or ".adapter_up." in k for k in keys)


def test_loads_a_checkpoint_written_by_the_llm_adapters_fork(tiny_model_dir, tmp_path):
    """The fork's adapter_config.json fields, adapter_model.bin, keys without an adapter-name segment."""
    config = {
        "peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "base_model_name_or_path": "yahma/llama-7b-hf",
        "inference_mode": True, "bottleneck_size": 8, "non_linearity": "tanh", "adapter_dropout": 0.0,
        "use_parallel_adapter": False, "use_adapterp": False, "target_modules": ["down_proj"], "scaling": 1.0,
        "bias": "none", "init_weights": "bert", "modules_to_save": None,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    weights = {}
    for i in range(2):
        prefix = f"base_model.model.model.layers.{i}.mlp.down_proj"
        weights[f"{prefix}.adapter_down.weight"] = torch.randn(8, 32) * 0.1
        weights[f"{prefix}.adapter_up.weight"] = torch.randn(32, 8) * 0.1
    torch.save(weights, tmp_path / "adapter_model.bin")

    model = PeftModel.from_pretrained(load(tiny_model_dir), tmp_path)
    down = layer_named(model, "layers.1.mlp.down_proj")
    assert torch.equal(down.adapter_up["default"].weight, weights["base_model.model.model.layers.1.mlp.down_proj.adapter_up.weight"])
    x = torch.randn(2, 3, 64)
    h = F.linear(x, down.base_layer.weight)
    D, U = down.adapter_down["default"].weight, down.adapter_up["default"].weight
    torch.testing.assert_close(down(x), h + by_hand(h, D, U, 1.0), atol=1e-6, rtol=1e-6)


def test_multiple_adapters_set_adapter_and_disable_adapter(tiny_model_dir, tmp_path):
    base = logits(load(tiny_model_dir))
    model = bottleneck(load(tiny_model_dir), bottleneck_size=8)
    first = logits(model)
    model.add_adapter("parallel", BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True, scaling=4))
    assert torch.equal(logits(model), first)  # an added adapter is not active
    model.set_adapter("parallel")
    second = logits(model)
    assert not torch.allclose(second, first)
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"parallel"}
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
    model.set_adapter("default")
    assert torch.equal(logits(model), first)

    model.save_pretrained(tmp_path)  # one folder per adapter: default at the root, others below
    reloaded = PeftModel.from_pretrained(load(tiny_model_dir), tmp_path)
    reloaded.load_adapter(tmp_path / "parallel", adapter_name="parallel")
    assert torch.equal(logits(reloaded), first)
    reloaded.set_adapter("parallel")
    assert torch.equal(logits(reloaded), second)


def test_unload_gives_back_the_base_model_and_merging_is_refused(tiny_model_dir):
    base = logits(load(tiny_model_dir))
    model = bottleneck(load(tiny_model_dir), bottleneck_size=8)
    with pytest.raises(UsageError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(logits(model.unload()), base)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(target_modules=["q_proj"]), "no serial bottleneck placement for 'model.layers.0.self_attn.q_proj'"),
        (dict(non_linearity="swishy"), "unknown --non_linearity"),
        (dict(scaling="big"), "--scaling must be a number or 'learned'"),
        (dict(init_weights="xavier"), "unknown init_weights"),
        (dict(use_parallel_adapter=True, use_adapterp=True), "exclude each other"),
        (dict(bottleneck_size=0), "--bottleneck_size must be a positive integer"),
    ],
)
def test_bad_settings_give_one_line_usage_errors(tiny_model_dir, settings, message):
    with pytest.raises(UsageError, match=message) as raised:
        bottleneck(load(tiny_model_dir), **settings)
    assert "\n" not in str(raised.value)


def test_gpt2_attention_c_proj_has_no_serial_placement(tiny_model_dir):
    with pytest.raises(UsageError, match=r"attn\.c_proj.*--use_parallel_adapter"):
        bottleneck(load(tiny_model_dir, "gpt2"), target_modules=["c_proj"])
    assert bottleneck(load(tiny_model_dir, "gpt2"), target_modules=["mlp.c_proj"], bottleneck_size=8)


# --- every family, through the one table -------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_with_the_defaults(tiny_model_dir, family, parallel):
    model = adapters.build(load(tiny_model_dir, family), "bottleneck", {"use_parallel_adapter": parallel})
    assert model.peft_config["default"].target_modules
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".adapter_down." in n or ".adapter_up." in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("adapterh", dict(use_parallel_adapter=False, use_adapterp=False, scaling=1.0)),
        ("AdapterP", dict(use_parallel_adapter=False, use_adapterp=True, scaling=1.0)),
        ("parallel", dict(use_parallel_adapter=True, use_adapterp=False, scaling=1.0)),
        ("scaled_parallel", dict(use_parallel_adapter=True, use_adapterp=False, scaling=4.0)),
    ],
)
def test_aliases_record_canonical_settings(tiny_model_dir, tmp_path, name, expected):
    model = adapters.build(load(tiny_model_dir), name, {"scaling": 1.0, "bottleneck_size": 8})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK"
    assert {k: saved[k] for k in expected} == expected
    if name == "AdapterP":
        assert saved["target_modules"] == ["down_proj"]


def test_scaled_parallel_keeps_a_scale_the_user_chose():
    _, options = adapters.resolve("scaled_parallel", {"scaling": 2.0})
    assert options["scaling"] == 2.0 and options["use_parallel_adapter"] is True
    _, options = adapters.resolve("scaled_parallel", {"scaling": "learned"})
    assert options["scaling"] == "learned"


# --- bitsandbytes 8-bit and 4-bit bases (they run on the CPU) ------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_wraps_bitsandbytes_layers(tiny_model_dir, tmp_path, bits):
    bnb = pytest.importorskip("bitsandbytes")
    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    layer_type = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit

    def quantized():
        return load(tiny_model_dir, quantization_config=quantization, device_map={"": "cpu"})

    def quantized_logits(model):
        # In eval mode bnb's CPU 4-bit kernel repacks weights in blocks of 64, wider than the tiny model's 32;
        # train mode (the tiny models have no dropout) keeps the plain kernel.
        model.train()
        with torch.no_grad():
            return model(input_ids=IDS).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bnb's notes on casting inputs to fp16
        base = quantized_logits(quantized())
        identity = bottleneck(quantized(), init_weights="mam_adapter", bottleneck_size=8)
        assert isinstance(layer_named(identity, "layers.0.mlp.up_proj").base_layer, layer_type)
        assert torch.equal(quantized_logits(identity), base)

        model = adapters.build(quantized(), "bottleneck", {"bottleneck_size": 8})
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        model.save_pretrained(tmp_path)
        reloaded = PeftModel.from_pretrained(quantized(), tmp_path)
        assert torch.equal(quantized_logits(reloaded), quantized_logits(model))
