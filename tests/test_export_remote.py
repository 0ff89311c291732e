"""Issue "Every model leaves": the remote-code form (export/remote) computes what scalevec computes, as a
transformers causal LM does (KV cache, left padding, bf16, save_pretrained, gradient checkpointing, Trainer)."""

import dataclasses
import json

import pytest
import torch
from test_model import randomize_scales

from scalevec import ModelConfig, apply_strategy, build_model, strategy
from scalevec.config import MoEConfig
from scalevec.export.remote import code_files, save_remote
from scalevec.generate import generate

transformers = pytest.importorskip("transformers")

BASE = ModelConfig(preset="", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                   max_seq_len=64)
SHAPES = {"dense": (BASE, None),
          "moe": (dataclasses.replace(BASE, moe_experts=4, moe_top_k=2, moe_every=2, moe_d_expert=24,
                                      tie_embeddings=False), MoEConfig(normalize_top_k=False)),
          "moe-shared": (dataclasses.replace(BASE, moe_experts=4, moe_top_k=2, moe_shared_expert=True),
                         MoEConfig(router="sigmoid", balance="bias"))}
PRESETS = ["none", "standard", "hg", "dp", "dnp", "or", "er", "iwd", "gemma", "qknorm", "unified", "hg+dp+er",
           "dnp+or"]


def scalevec_model(shape: str, name: str, seed: int = 3, **fields):
    m, moe = SHAPES[shape]
    model = build_model(dataclasses.replace(m, **fields), strategy(name), seed=seed, moe=moe)
    randomize_scales(model, seed)
    with torch.no_grad():
        for layer in model.moe_layers():  # expert bias only steers the choice under balance = bias
            layer.expert_bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                             **{"dtype": torch.float32, **kwargs}).eval()


def tokens(batch=2, length=20, seed=1):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def check_causal_lm(model, hf):
    """Logits at fp32 parity; greedy text identical; KV-cache generation equal to full recompute; a left-padded
    batch equal to each row alone."""
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    prompt = x[:, :6]
    expected = generate(model, prompt, 8)
    for cache in (True, False):
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                          use_cache=cache, pad_token_id=0)
        assert torch.equal(out, expected), cache
    rows = [x[0, :9], x[1, :5]]
    padded = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    with torch.no_grad():
        batch = hf(padded, attention_mask=mask).logits
        for i, row in enumerate(rows):
            torch.testing.assert_close(batch[i, 9 - len(row):], hf(row[None]).logits[0], atol=1e-5, rtol=1e-5)
    out = hf.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = hf.generate(row[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, 9:], alone[0, len(row):])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", PRESETS)
def test_remote_export_computes_what_scalevec_computes(tmp_path, shape, name):
    model = scalevec_model(shape, name)
    save_remote(model, tmp_path)
    hf = load(tmp_path)
    assert type(hf).__name__ == "ScalevecForCausalLM"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)
    if (shape, name) in (("dense", "unified"), ("moe", "dnp+or"), ("moe-shared", "gemma"), ("moe-shared", "hg")):
        check_causal_lm(model, hf)


FEATURES = {"gemma-features": ("gemma", dict(embedding_scale=True, attn_softcap=20.0, final_softcap=15.0,
                                              sliding_window=6, full_attention_every=2, rope_local_theta=1000.0,
                                              query_pre_attn_scalar=12)),
            "layernorm-no-prenorm-bias": ("dnp+or", dict(norm="layer", pre_norm=False, qkv_bias=True)),
            "full-qk-llama3-untied": ("unified", dict(rope_scaling="llama3", rope_original_max_seq_len=16,
                                                      tie_embeddings=False)),
            "dnp-everywhere": ("hg+or", {})}


@pytest.mark.parametrize("case", list(FEATURES))
def test_remote_export_covers_every_model_feature(tmp_path, case):
    name, fields = FEATURES[case]
    s = strategy(name)
    if case == "full-qk-llama3-untied":
        s = strategy(name, qk_scale_shape="full", qk_norm_group="full")
    if case == "dnp-everywhere":
        s = strategy(name, dnp=["q", "k", "v", "o", "gate", "up", "down"], qk_scale_shape="full")
    model = build_model(dataclasses.replace(BASE, **fields), s, seed=5)
    randomize_scales(model, 5)
    save_remote(model.eval(), tmp_path)
    check_causal_lm(model, load(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_scalevec.ScalevecForCausalLM"


def test_the_code_is_the_same_for_every_export_and_imports_only_torch_and_transformers(tmp_path):
    save_remote(scalevec_model("dense", "unified"), tmp_path / "a")
    save_remote(scalevec_model("moe-shared", "gemma", seed=7), tmp_path / "b")
    for name, path in code_files().items():
        text = path.read_text()
        assert (tmp_path / "a" / name).read_text() == text == (tmp_path / "b" / name).read_text()
        imports = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
        assert imports <= {"math", "torch", "transformers", ""}, imports  # "" : the relative import of the config


def test_remote_model_loads_in_bf16_saves_round_trip_and_trains(tmp_path):
    model = scalevec_model("moe-shared", "unified")
    save_remote(model, tmp_path / "export")
    bf16 = load(tmp_path / "export", dtype=torch.bfloat16)  # loaded, not run: no bf16 math on CPU
    state = load(tmp_path / "export").state_dict()
    for name, tensor in bf16.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name].to(torch.bfloat16)), name
    x = tokens()
    with torch.no_grad():
        reference = model(x)
    hf = load(tmp_path / "export")
    hf.save_pretrained(tmp_path / "again")
    again, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).logits, reference, atol=1e-4, rtol=1e-4)
    # gradient checkpointing recomputes each layer in backward: the same gradients
    hf.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in hf.model.layers)
        hf.zero_grad()
        hf(x, labels=x).loss.backward()
        grads.append(hf.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_one_trainer_step_on_a_remote_export_lowers_the_loss(tmp_path):
    from torch.utils.data import Dataset

    save_remote(scalevec_model("moe", "unified"), tmp_path / "export")
    hf = load(tmp_path / "export")
    x = tokens(8, 16, seed=4)

    class Batch(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"input_ids": x[i], "labels": x[i]}

    def loss():
        with torch.no_grad():
            return hf.eval()(x, labels=x).loss.item()

    before = loss()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8,
                                          max_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no",
                                          use_cpu=True, logging_strategy="no")
    transformers.Trainer(model=hf, args=args, train_dataset=Batch()).train()
    assert loss() < before


def hf_llama(tie=False):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("name, form", [("hg+or", "LlamaForCausalLM"), ("hg+dp+er", "LlamaForCausalLM"),
                                        ("unified", "ScalevecForCausalLM"), ("dnp-ffn+or", "ScalevecForCausalLM")])
def test_save_pretrained_after_apply_strategy_reloads_as_what_it_computes(tmp_path, name, form):
    """Without unapply: the plain family checkpoint where the strategy has one, the remote-code form otherwise;
    the live model untouched."""
    model = hf_llama(tie=name == "hg+dp+er")
    apply_strategy(model, name)
    x = tokens()
    with torch.no_grad():  # a random perturbation of every parameter, so that every scale matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trained = model(x).logits
    names = sorted(n for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path, state_dict=model.state_dict())  # as HF Trainer calls it
    assert sorted(n for n, _ in model.named_parameters()) == names and hasattr(model, "scalevec_strategy")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                                       output_loading_info=True)
    assert type(reloaded).__name__ == form
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        difference = (reloaded.eval()(x).logits - trained).abs().max().item()
        assert torch.equal(model(x).logits, trained)
    assert difference < 1e-4



def test_hf_trainer_of_a_converted_model_checkpoints_for_resume_and_saves_what_it_computes(tmp_path):
    """checkpoint-N folders keep the converted parameters (resume_from_checkpoint loads them: tests/test_stack.py);
    the final save_model writes the reloadable form."""
    from safetensors import safe_open

    model = hf_llama()
    apply_strategy(model, "unified")
    x = tokens(8, 16, seed=4)
    data = [{"input_ids": row, "labels": row} for row in x]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1,
                                          per_device_train_batch_size=8, report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    with safe_open(str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"), "pt") as checkpoint:
        assert "model.layers.0.self_attn.q_proj.projection.weight" in checkpoint.keys()
    trainer.save_model(str(tmp_path / "final"))
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", trust_remote_code=True,
                                                                       output_loading_info=True)
    assert type(reloaded).__name__ == "ScalevecForCausalLM" and not info["missing_keys"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x).logits, model.eval()(x).logits, atol=1e-4, rtol=1e-4)


def test_remote_model_returns_hidden_states_as_the_family_does(tmp_path, small_data):
    """output_hidden_states: the embeddings and each layer's input as the Llama export of the same model gives them,
    then the final norm's output (folding moves an untied head's γ into the head, so that one is the form's own)."""
    from test_export import make_run

    from scalevec.export.hf import export_run

    make_run(tmp_path / "run", small_data, strategy("hg+or"), tie=False)
    export_run(tmp_path / "run", tmp_path / "llama", log=lambda *_: None)
    export_run(tmp_path / "run", tmp_path / "remote", log=lambda *_: None, family="remote")
    llama, remote = load(tmp_path / "llama"), load(tmp_path / "remote")
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = llama(x, output_hidden_states=True), remote(x, output_hidden_states=True)
        assert remote(x).hidden_states is None
        last = remote.model(x).last_hidden_state
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states[:-1], theirs.hidden_states[:-1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.hidden_states[-1], last)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
