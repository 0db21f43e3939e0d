from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from mmclin.errors import ConfigError
from mmclin.fusion import MLPProjector, PerceiverResampler
from mmclin.llm import MEDIA_TOKEN, lm_hidden_size, lm_layers, load_causal_lm, save_lm

TINY = {"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 256}
TEXT = "Right lower lobe: 4 mm nodule, unchanged — no effusion. Ünïcode ✓"


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    return load_causal_lm(tiny=TINY)


def test_tiny_lm_generates_deterministic_tokens(tiny_lm):
    model, tokenizer = tiny_lm
    batch = tokenizer(["the heart is", "no acute"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    first = model.generate(**batch, **kwargs)
    again = model.generate(**batch, **kwargs)
    assert first.shape == (2, batch["input_ids"].shape[1] + 6)
    assert torch.equal(first, again)
    assert int(first.max()) < len(tokenizer)


def test_offline_tokenizer_round_trips_text_and_directory(tiny_lm, tmp_path):
    _, tokenizer = tiny_lm
    ids = tokenizer(f"{TEXT} {MEDIA_TOKEN} end").input_ids
    media_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
    assert media_id != tokenizer.unk_token_id and ids.count(media_id) == 1
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer(TEXT).input_ids, skip_special_tokens=True) == TEXT
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded(f"{TEXT} {MEDIA_TOKEN} end").input_ids == ids
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    # Built again from nothing: the same vocabulary, so a checkpoint's ids mean the same thing.
    assert load_causal_lm(tiny=TINY).tokenizer.get_vocab() == tokenizer.get_vocab()


def _tiny_hf(config):
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=64),
        Qwen2Config(
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            vocab_size=64,
        ),
        GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0),
    ],
    ids=["llama", "qwen2", "gpt2"],
)
def test_lm_layers_finds_decoder_layers(config):
    model = _tiny_hf(config)
    layers = lm_layers(model)
    assert len(layers) == 3 and lm_hidden_size(model) == 16
    expected = model.transformer.h if isinstance(config, GPT2Config) else model.model.layers
    assert layers is expected


def test_lm_layers_through_peft_wrapper():
    model, _ = load_causal_lm(tiny={**TINY, "num_hidden_layers": 3}, lora={"r": 2, "alpha": 4})
    assert type(model).__name__.startswith("Peft")
    layers = lm_layers(model)
    assert len(layers) == 3 and any("lora_A" in name for name, _ in layers[0].named_modules())
    assert lm_hidden_size(model) == 32


def test_lm_layers_error_names_what_was_searched():
    model = _tiny_hf(
        LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    )
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match=r"num_hidden_layers=5.*layers \(len 2\)"):
        lm_layers(model)


def test_freeze_all_and_lora_trains_only_adapters(tiny_lm):
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())

    model, tokenizer = load_causal_lm(tiny=TINY, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    batch = tokenizer(["a small nodule"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's must not be.
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)


def test_freeze_lora_mismatch_is_rejected():
    with pytest.raises(ConfigError, match="all_but_lora"):
        load_causal_lm(tiny=TINY, freeze="all", lora={"r": 2})
    with pytest.raises(ConfigError, match="unknown LlamaConfig fields"):
        load_causal_lm(tiny={"hiden_size": 8})


def test_local_directory_round_trip(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    save_lm(model, tokenizer, tmp_path / "lm")
    loaded, loaded_tokenizer = load_causal_lm(str(tmp_path / "lm"), dtype="float32")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert loaded_tokenizer(TEXT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.config._attn_implementation == "sdpa"


def test_missing_lm_gives_clear_error_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable at import; patch its constant too, so no request is even tried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline = r"not found locally and the hub is unreachable \(offline mode is on\); pass a local directory"
    with pytest.raises(OSError, match=offline):
        load_causal_lm("nobody-here/no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing"))


def test_perceiver_resampler_masks_padding_and_fixes_length():
    torch.manual_seed(0)
    resampler = PerceiverResampler(in_dim=24, out_dim=40, n_latents=6, depth=2, n_heads=4).eval()
    tokens = torch.randn(2, 10, 24, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    out, out_mask = resampler(tokens, mask)
    assert out.shape == (2, 6, 40) and resampler.out_dim == 40
    assert out_mask.shape == (2, 6) and out_mask.all()

    garbage = tokens.detach().clone()
    garbage[0, 7:] = 1e4 * torch.randn(3, 24)
    torch.testing.assert_close(resampler(garbage, mask)[0], out)
    # Same sample without the padding: padding is as if absent.
    torch.testing.assert_close(resampler(tokens[:1, :7])[0], out[:1])
    # Output length does not depend on the input length.
    assert resampler(torch.randn(1, 50, 24))[0].shape == (1, 6, 40)

    out.sum().backward()
    assert tokens.grad[0, :7].abs().sum() > 0 and tokens.grad[1].abs().sum() > 0
    assert tokens.grad[0, 7:].abs().sum() == 0


def test_perceiver_latents_differ_at_init():
    resampler = PerceiverResampler(in_dim=16, out_dim=16, n_latents=4, depth=1, n_heads=2)
    out, _ = resampler(torch.randn(1, 5, 16))
    assert not torch.allclose(out[0, 0], out[0, 1])


def test_mlp_projector_shapes_and_mask():
    projector = MLPProjector(in_dim=24, out_dim=40)
    tokens, mask = torch.randn(2, 7, 24), torch.rand(2, 7) > 0.3
    out, out_mask = projector(tokens, mask)
    assert out.shape == (2, 7, 40) and out_mask is mask and projector.out_dim == 40
    assert MLPProjector(24, 40, hidden_dim=8, n_layers=3)(tokens)[0].shape == (2, 7, 40)
    with pytest.raises(ValueError, match=r"tokens must be \(B, T, 24\)"):
        projector(torch.randn(2, 7, 25))
