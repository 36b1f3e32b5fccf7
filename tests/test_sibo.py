"""SIBO: the initial token embeddings mixed into the input of LoRA and bottleneck adapter branches."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from peft import LoraConfig, PeftModel
from peft_ext import adapters
from peft_ext.errors import UsageError

IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250], [1, 8, 8, 64, 120, 200, 31, 2]])
LORA = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
MLP_INPUT = {"llama": "up_proj", "gptj": "fc_in", "bloom": "dense_h_to_4h", "opt": "fc1", "gpt2": "mlp.c_fc"}


def load(tiny_model_dir, family="llama"):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(family))


def boosted_lora(tiny_model_dir, family="llama", lam=0.3, **options):
    targets = options.pop("target_modules", ["q_proj", "up_proj"] if family == "llama" else [MLP_INPUT[family]])
    model = adapters.build(
        load(tiny_model_dir, family), "lora", {**LORA, "target_modules": targets, "embedding_lambda": lam, **options}
    )
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA starts as the identity; give its branch something to say
            p.data = torch.randn_like(p) * 0.2
    return model


def boosted_bottleneck(tiny_model_dir, family="llama", lam=0.3, **options):
    return adapters.build(load(tiny_model_dir, family), "bottleneck", {"bottleneck_size": 8, "embedding_lambda": lam, **options})


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def named(model, suffix):
    return next(m for name, m in model.named_modules() if name.endswith(suffix))


def inputs(module):
    """A list that receives the first input of every call of `module`, as its forward sees it (after SIBO)."""
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    return seen


def outputs(module):
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    return seen


# --- the formula ------------------------------------------------------------------------------------------


def test_mix_with_lambda_zero_is_the_identity_bit_for_bit(tiny_model_dir):
    model = boosted_lora(tiny_model_dir)
    booster = model.base_model.model._sibo_booster
    z = torch.randn(2, 8, 32)
    model(input_ids=IDS)
    assert torch.equal(booster.mix(0.0, z), z)


def test_lambda_zero_installs_nothing_and_equals_the_unboosted_model(tiny_model_dir):
    plain = adapters.build(load(tiny_model_dir), "bottleneck", {"bottleneck_size": 8})
    off = adapters.build(load(tiny_model_dir), "bottleneck", {"bottleneck_size": 8, "embedding_lambda": 0.0, "ffn": True})
    off.load_state_dict(plain.state_dict())
    assert not hasattr(off.base_model.model, "_sibo_booster")
    assert torch.equal(logits(off), logits(plain))
    lora = adapters.build(load(tiny_model_dir), "lora", {**LORA, "embedding_lambda": 0})
    assert type(lora.peft_config["default"]) is LoraConfig


@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("family", ["llama", "gptj", "bloom", "opt", "gpt2"])
def test_lora_branch_input_is_the_mix_of_its_input_and_h0(tiny_model_dir, family, lam):
    model = boosted_lora(tiny_model_dir, family, lam)
    layer = named(model, "." + MLP_INPUT[family])  # in the first layer
    v = inputs(layer)
    mixed = inputs(layer.lora_dropout["default"])
    out = outputs(layer)
    logits(model)
    h0 = model.get_input_embeddings().weight[IDS]  # the raw embedding lookup, by hand
    expected_mix = (1 - lam) * v[0].reshape(h0.shape) + lam * h0
    torch.testing.assert_close(mixed[0].reshape(h0.shape), expected_mix, atol=1e-6, rtol=1e-6)
    if family == "llama":  # the whole layer: y = W z + (α/r) B A mix(z); the frozen path sees z
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = F.linear(v[0], layer.base_layer.weight) + 2.0 * F.linear(F.linear(expected_mix, A), B)
        torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_bottleneck_before_w_adapters_see_the_mix_and_the_residual_does_not(tiny_model_dir):
    lam = 0.3
    model = boosted_bottleneck(tiny_model_dir, scaling=2.0)
    h0 = model.get_input_embeddings().weight[IDS]
    probes = {}
    for name in ("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"):
        layer = named(model, name)
        probes[name] = (layer, inputs(layer), outputs(layer))
    down = named(model, "layers.1.mlp.down_proj")
    assert not down.adapter_dropout["default"]._forward_pre_hooks  # the after-W adapter is not boosted
    logits(model)
    for layer, z, y in probes.values():  # y = W (z + s · A((1 − λ) z + λ h0))
        D, U = layer.adapter_down["default"].weight, layer.adapter_up["default"].weight
        adapter = 2.0 * F.linear(torch.tanh(F.linear((1 - lam) * z[0] + lam * h0, D)), U)
        torch.testing.assert_close(y[0], F.linear(z[0] + adapter, layer.base_layer.weight), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family, norm", [("gptj", "h.0.ln_1"), ("bloom", "h.0.post_attention_layernorm")])
def test_gptj_and_bloom_bottleneck_mix_the_whole_mlp_input(tiny_model_dir, family, norm):
    lam = 0.3
    base = logits(load(tiny_model_dir, family))
    model = boosted_bottleneck(tiny_model_dir, family, lam, use_adapterp=True)  # SIBO's GPT-J run: fc_out only
    z = outputs(named(model, norm))
    mixed = inputs(named(model, "h.0.mlp"))
    logits(model)
    h0 = model.get_input_embeddings().weight[IDS]
    torch.testing.assert_close(mixed[0], (1 - lam) * z[0] + lam * h0, atol=1e-6, rtol=1e-6)
    with model.disable_adapter():  # the frozen MLP sees the mix only while the adapter is on
        assert torch.equal(logits(model), base)


# --- generation, gradient checkpointing, DDP ----------------------------------------------------------


@pytest.mark.parametrize(
    "family, make, beams", [("llama", boosted_lora, 1), ("llama", boosted_bottleneck, 2), ("gptj", boosted_bottleneck, 1)]
)
def test_generate_gives_the_same_tokens_with_and_without_the_kv_cache(tiny_model_dir, family, make, beams):
    model = make(tiny_model_dir, family)
    model.eval()
    site = named(model, ".mlp" if family == "gptj" else ".up_proj")
    mixed = inputs(site if family == "gptj" else (site.lora_dropout if make is boosted_lora else site.adapter_dropout)["default"])
    prompt = IDS[:1, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=beams, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kwargs)
    assert cached.shape[1] == 13 and torch.equal(cached, uncached)
    assert [x.shape[1] for x in mixed[:3]] == [5, 1, 1]  # with the cache: the prompt, then one new token


def test_a_pass_fed_with_inputs_embeds_mixes_those(tiny_model_dir):
    model = boosted_lora(tiny_model_dir)
    model.eval()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(IDS)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=IDS).logits, atol=0, rtol=0)


def loss_and_grads(model):
    model.train()
    model.zero_grad()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("make", [boosted_lora, boosted_bottleneck])
def test_gradient_checkpointing_recomputes_the_same_mix(tiny_model_dir, make, reentrant):
    model = make(tiny_model_dir)
    loss, grads = loss_and_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    site = named(model, "layers.0.mlp.up_proj")
    calls = inputs((site.lora_dropout if make is boosted_lora else site.adapter_dropout)["default"])
    checkpointed_loss, checkpointed_grads = loss_and_grads(model)
    assert len(calls) == 2  # the forward pass and its recomputation in backward
    torch.testing.assert_close(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_ddp_trains_a_boosted_model_like_the_plain_one(tiny_model_dir, tmp_path):
    model = boosted_lora(tiny_model_dir)
    loss, grads = loss_and_grads(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        model.zero_grad()
        ddp_loss = ddp(input_ids=IDS, labels=IDS).loss
        ddp_loss.backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(ddp_loss.detach(), loss)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad)


# --- settings: saved, restored, reported ----------------------------------------------------------------


def test_settings_are_saved_and_restored_by_peft_model_from_pretrained(tiny_model_dir, tmp_path):
    for name, model in [("lora", boosted_lora(tiny_model_dir)), ("bottleneck", boosted_bottleneck(tiny_model_dir))]:
        model.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert (saved["embedding_lambda"], saved["ffn"]) == (0.3, True)
        reloaded = PeftModel.from_pretrained(load(tiny_model_dir), tmp_path / name)
        assert reloaded.peft_config["default"].embedding_lambda == 0.3
        assert hasattr(reloaded.base_model.model, "_sibo_booster")
        assert torch.equal(logits(reloaded), logits(model))
        saved["embedding_lambda"] = 0.0  # the same weights without the boost answer differently
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(saved))
        assert not torch.allclose(logits(PeftModel.from_pretrained(load(tiny_model_dir), tmp_path / name)), logits(model))


def test_lora_without_sibo_saves_what_plain_peft_saves(tiny_model_dir, tmp_path):
    adapters.build(load(tiny_model_dir), "lora", LORA).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "embedding_lambda" not in saved and "ffn" not in saved


def test_a_second_adapter_is_boosted_by_its_own_settings(tiny_model_dir, tmp_path):
    boosted = boosted_lora(tiny_model_dir)
    boosted.save_pretrained(tmp_path)
    model = adapters.build(load(tiny_model_dir), "lora", {**LORA, "target_modules": ["q_proj", "up_proj"]})
    plain = logits(model)
    model.load_adapter(tmp_path, adapter_name="sibo")
    assert torch.equal(logits(model), plain)
    model.set_adapter("sibo")
    assert torch.equal(logits(model), logits(boosted))
    model.set_adapter("default")
    model.delete_adapter("sibo")
    assert not hasattr(model.base_model.model, "_sibo_booster")


def test_unload_removes_the_boost_and_merging_is_refused(tiny_model_dir):
    base = logits(load(tiny_model_dir))
    model = boosted_lora(tiny_model_dir)
    with pytest.raises(UsageError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not hasattr(unloaded, "_sibo_booster") and torch.equal(logits(unloaded), base)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("lora", {**LORA, "target_modules": ["q_proj", "v_proj"]}, "LoRA branch of up_proj, which is not a LoRA target"),
        ("bottleneck", {"target_modules": ["down_proj"]}, "mixes into the adapters before W"),
        ("adapterp", {}, "mixes into the adapters before W"),
        ("parallel", {}, (r"SIBO boosts parallel adapters on gptj and bloom only \(it mixes into their whole MLP input\), "
                          r"not on llama; boost serial adapters instead, --adapter_name adapterh \(its adapters before "
                          r"gate_proj, up_proj take the mix\), or LoRA with up_proj among its targets; or pass "
                          "--embedding_lambda 0")),
        ("dora", LORA, "boosts lora and bottleneck adapters, not dora"),
        ("ia3", {}, "boosts lora and bottleneck adapters, not ia3"),
    ],
)
def test_a_missing_site_is_an_error(tiny_model_dir, method, options, message):
    with pytest.raises(UsageError, match=message):
        adapters.build(load(tiny_model_dir), method, {**options, "embedding_lambda": 0.1})


def test_a_partly_missing_bottleneck_site_is_a_warning(tiny_model_dir):
    with pytest.warns(UserWarning, match="gate_proj carry no bottleneck adapter before W"):
        boosted_bottleneck(tiny_model_dir, target_modules=["up_proj"])


def test_ffn_false_injects_nothing_and_says_so(tiny_model_dir):
    with pytest.warns(UserWarning, match="--ffn False injects nothing"):
        model = boosted_bottleneck(tiny_model_dir, ffn="False")
    assert model.peft_config["default"].ffn is False
    assert not hasattr(model.base_model.model, "_sibo_booster")


@pytest.mark.parametrize("options, message", [({"embedding_lambda": 1.5}, r"in \[0, 1\]"), ({"embedding_lambda": 0.1, "ffn": "maybe"}, "--ffn must be True or False")])
def test_bad_sibo_flags_are_usage_errors(tiny_model_dir, options, message):
    with pytest.raises(UsageError, match=message):
        adapters.build(load(tiny_model_dir), "bottleneck", {"bottleneck_size": 8, **options})
