"""export_hf_checkpoint.py and export_state_dict_checkpoint.py on tiny random models of several families."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from checkpoints import make_checkpoint, save_wide_llama
from conftest import ROOT
from peft_ext.errors import UsageError
from peft_ext.export import meta_ffn_params, meta_ffn_width


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_hf = load_script("export_hf_checkpoint")
export_meta = load_script("export_state_dict_checkpoint")

IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250], [1, 8, 8, 64, 120, 200, 31, 2]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def adapter_logits(base: str, checkpoint: str) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), checkpoint))


@pytest.mark.parametrize("family, method", [
    ("llama", "lora"), ("llama", "dora"), ("llama", "ia3"), ("gpt2", "lora"),
    ("bloom", "lora"), ("opt", "ia3"), ("gpt_neox", "dora"), ("qwen2", "lora"),
])
def test_merged_model_gives_the_adapter_models_logits(tiny_model_dir, tmp_path, family, method):
    base = tiny_model_dir(family)
    checkpoint = make_checkpoint(base, str(tmp_path / "ckpt"), method)
    export_hf.main(lora_weights=checkpoint, output_dir=str(tmp_path / "merged"))

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not [k for k in merged.state_dict() if "lora" in k or "ia3" in k or "base_layer" in k]
    expected = adapter_logits(base, checkpoint)
    assert not torch.allclose(expected, logits(AutoModelForCausalLM.from_pretrained(base)), atol=1e-3)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-5)


def test_export_is_a_plain_model_that_loads_without_peft(llama_lora, tmp_path):
    out = tmp_path / "merged"
    export_hf.main(weights_path=llama_lora, output_dir=str(out))  # the seed's flag name
    assert {"config.json", "model.safetensors", "tokenizer.json", "prompt_template.json"} <= set(os.listdir(out))
    assert all(os.stat(out / name).st_mode & 0o044 == 0o044 for name in os.listdir(out))  # readable by others
    code = (
        "import sys; sys.modules['peft'] = None\n"  # any import of peft now fails
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"ids = AutoTokenizer.from_pretrained({str(out)!r})('What is 12*7?', return_tensors='pt').input_ids\n"
        "print(type(model).__name__, model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] - ids.shape[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LlamaForCausalLM", "3"]


def test_merging_into_another_base_than_the_run_names_is_noted(llama, llama_lora, tmp_path, monkeypatch, capsys):
    """$BASE_MODEL (or --base_model) wins over run.json; a copy of another name may still be another model."""
    other = shutil.copytree(llama, tmp_path / "other-base")
    monkeypatch.setenv("BASE_MODEL", str(other))
    export_hf.main(lora_weights=llama_lora, output_dir=str(tmp_path / "merged"))
    assert f"note: {llama_lora} was trained on the base model {llama}; merging it into {other}\n" in capsys.readouterr().out
    monkeypatch.setenv("BASE_MODEL", llama)
    export_hf.main(lora_weights=llama_lora, output_dir=str(tmp_path / "merged"), overwrite=True)
    assert "note:" not in capsys.readouterr().out


def test_large_models_are_sharded(llama, llama_lora, tmp_path):
    export_hf.main(lora_weights=llama_lora, output_dir=str(tmp_path / "merged"), max_shard_size="60KB")
    files = os.listdir(tmp_path / "merged")
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), adapter_logits(llama, llama_lora), rtol=1e-4, atol=1e-5)


def test_export_keeps_the_base_models_dtype(llama, tmp_path):
    """Merging runs in fp32 on a CPU; an fp16 base must still give an fp16 export, not one twice its size."""
    base = str(tmp_path / "fp16-base")
    AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.link(os.path.join(llama, name), os.path.join(base, name))
    checkpoint = make_checkpoint(base, str(tmp_path / "ckpt"))
    export_hf.main(lora_weights=checkpoint, output_dir=str(tmp_path / "merged"))
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


@pytest.mark.parametrize("method, options, reason", [
    ("bottleneck", {}, "bottleneck adapters are nonlinear"),
    ("prefix-tuning", {}, "virtual tokens or key/value prefixes"),
    ("prompt-tuning", {}, "virtual tokens or key/value prefixes"),
    ("lora", {"embedding_lambda": 0.3, "target_modules": ["q_proj", "up_proj"]}, "uses SIBO"),
])
def test_unmergeable_adapters_are_refused_with_the_reason(llama, tmp_path, method, options, reason):
    checkpoint = make_checkpoint(llama, str(tmp_path / "ckpt"), method, **options)
    for script in (export_hf, export_meta):
        with pytest.raises(UsageError, match=f"cannot be merged.*{reason}.*use it unmerged instead"):
            script.main(lora_weights=checkpoint, output_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_bad_input_gives_one_clear_error(llama, llama_lora, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    wide = save_wide_llama(llama, str(tmp_path / "wide"))
    cases = [
        (dict(lora_weights=str(tmp_path / "missing")), "does not exist"),
        (dict(lora_weights=str(tmp_path / "empty")), "holds no adapter_config.json"),
        (dict(lora_weights=llama_lora, base_model=wide), "does not fit this base model"),
        (dict(lora_weights=llama_lora, output_dir=str(tmp_path / "full")), "not empty; pass --overwrite"),
        (dict(lora_weights=llama_lora, output_dir=llama_lora, overwrite=True), "an input of this export"),
        (dict(), "--lora_weights is required"),
    ]
    for script in (export_hf, export_meta):
        for flags, message in cases:
            with pytest.raises(UsageError, match=message):
                script.main(**{"output_dir": str(tmp_path / "out"), **flags})
    monkeypatch.setenv("BASE_MODEL", str(tmp_path / "no-such-base"))  # the seed's way to name the base
    with pytest.raises(UsageError, match="no-such-base.*does not exist"):
        export_hf.main(lora_weights=llama_lora, output_dir=str(tmp_path / "out"))
    monkeypatch.delenv("BASE_MODEL")
    for size in ("abc", "5GiB", 0, "0GB"):  # save_pretrained would refuse these only after the merge
        with pytest.raises(UsageError, match="--max_shard_size must be a size such as 5GB"):
            export_hf.main(lora_weights=llama_lora, output_dir=str(tmp_path / "out"), max_shard_size=size)
    monkeypatch.chdir(tmp_path / "full")  # `--output_dir . --overwrite` would merge, then fail to replace "."
    for script in (export_hf, export_meta):
        with pytest.raises(UsageError, match="holds the current directory, which an export cannot replace"):
            script.main(lora_weights=llama_lora, output_dir=".", overwrite=True)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["empty", "full", "wide"]


def test_command_line_error_is_one_line_and_exit_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "export_hf_checkpoint.py"), "--lora_weights", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.splitlines()[-1]] and "does not exist" in errors[0]
    assert "Traceback" not in result.stderr


def test_overwrite_replaces_and_a_failed_export_leaves_nothing(llama_lora, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export_hf.main(lora_weights=llama_lora, output_dir=str(out), overwrite=True)
    assert "old.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)

    def disk_full(self, directory, **kwargs):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", disk_full)
    with pytest.raises(OSError):
        export_hf.main(lora_weights=llama_lora, output_dir=str(tmp_path / "new"))
    with pytest.raises(OSError):
        export_hf.main(lora_weights=llama_lora, output_dir=str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no "new", no staging folder left behind
    assert os.path.getsize(out / "model.safetensors") > 1000  # the earlier export is intact


# Meta's layout, read back the way transformers' convert_llama_weights_to_hf.py (write_model) reads it. That
# script is not shipped in the transformers 5.23 wheel, so its recipe is restated here from its published source.

def compute_intermediate_size(n, ffn_dim_multiplier=1, multiple_of=256):
    return multiple_of * ((int(ffn_dim_multiplier * int(8 * n / 3)) + multiple_of - 1) // multiple_of)


def hf_from_meta(folder) -> LlamaForCausalLM:
    params = json.loads((folder / "params.json").read_text())
    loaded = torch.load(folder / "consolidated.00.pth", map_location="cpu", weights_only=True)
    n_heads, dim = params["n_heads"], params["dim"]
    num_key_value_heads = params.get("n_kv_heads", n_heads)
    key_value_dim = dim // n_heads * num_key_value_heads

    def permute(w, n_heads, dim1=dim, dim2=dim):
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    state_dict = {
        "model.embed_tokens.weight": loaded["tok_embeddings.weight"],
        "model.norm.weight": loaded["norm.weight"],
        "lm_head.weight": loaded["output.weight"],
    }
    for i in range(params["n_layers"]):
        layer = f"model.layers.{i}."
        state_dict.update({
            layer + "self_attn.q_proj.weight": permute(loaded[f"layers.{i}.attention.wq.weight"], n_heads=n_heads),
            layer + "self_attn.k_proj.weight": permute(
                loaded[f"layers.{i}.attention.wk.weight"], n_heads=num_key_value_heads, dim1=key_value_dim
            ),
            layer + "self_attn.v_proj.weight": loaded[f"layers.{i}.attention.wv.weight"],
            layer + "self_attn.o_proj.weight": loaded[f"layers.{i}.attention.wo.weight"],
            layer + "mlp.gate_proj.weight": loaded[f"layers.{i}.feed_forward.w1.weight"],
            layer + "mlp.down_proj.weight": loaded[f"layers.{i}.feed_forward.w2.weight"],
            layer + "mlp.up_proj.weight": loaded[f"layers.{i}.feed_forward.w3.weight"],
            layer + "input_layernorm.weight": loaded[f"layers.{i}.attention_norm.weight"],
            layer + "post_attention_layernorm.weight": loaded[f"layers.{i}.ffn_norm.weight"],
        })
    assert len(loaded) == len(state_dict)  # nothing left over
    config = LlamaConfig(
        hidden_size=dim,
        intermediate_size=compute_intermediate_size(
            dim, params.get("ffn_dim_multiplier", 1), params.get("multiple_of", 256)
        ),
        num_attention_heads=n_heads,
        num_hidden_layers=params["n_layers"],
        rms_norm_eps=params["norm_eps"],
        num_key_value_heads=num_key_value_heads,
        vocab_size=params["vocab_size"],
        rope_theta=params.get("rope_theta", 10000.0),
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_meta_layout_converts_back_to_the_merged_model(llama, tmp_path, method):
    """The tiny LLaMA has 4 query and 2 key/value heads, so the wk un-permutation is checked for GQA too."""
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
    checkpoint = make_checkpoint(llama, str(tmp_path / "ckpt"), method, target_modules=targets)
    export_meta.main(lora_weights=checkpoint, output_dir=str(tmp_path / "meta"))
    assert {"consolidated.00.pth", "params.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "meta"))
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["dim"] == 32 and params["n_heads"] == 4 and params["n_kv_heads"] == 2 and params["vocab_size"] == 320
    converted = hf_from_meta(tmp_path / "meta")
    torch.testing.assert_close(logits(converted), adapter_logits(llama, checkpoint), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim, width", [(4096, 11008), (5120, 13824), (4096, 14336), (8192, 28672), (32, 64), (48, 97)])
def test_params_json_gives_back_the_mlp_width(dim, width):
    params = meta_ffn_params(dim, width)
    assert compute_intermediate_size(dim, params.get("ffn_dim_multiplier", 1), params["multiple_of"]) == width
    assert meta_ffn_width(dim, **params) == width
    if (dim, width) == (4096, 11008):  # LLaMA-7B: Meta's own params.json
        assert params == {"multiple_of": 256}


def test_state_dict_export_refuses_non_llama_models(tiny_model_dir, tmp_path):
    checkpoint = make_checkpoint(tiny_model_dir("gpt2"), str(tmp_path / "ckpt"))
    with pytest.raises(UsageError, match="Meta's LLaMA layout, and this base model is 'gpt2'"):
        export_meta.main(lora_weights=checkpoint, output_dir=str(tmp_path / "meta"))
