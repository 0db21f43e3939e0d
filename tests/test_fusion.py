"""Soft-prompt and gated cross-attention fusion on tiny random LMs (Llama, Qwen2, GPT-2) built from configs; the
fusion contract, checked by a third fusion that exists only in this file."""

from __future__ import annotations

import contextlib
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from encoders.timeseries import PatchTransformerEncoder
from mmclin.errors import ConfigError, DataError
from mmclin.fusion import CrossAttentionFusion, FusedInputs, Fusion, MediaTokens, SoftPromptFusion
from mmclin.fusion.cross_attention import (
    GatedCrossAttentionBlock,
    attach_cross_attention,
    placeholder_positions,
)
from mmclin.fusion.soft_prompt import IGNORE_INDEX, splice_media
from mmclin.llm import byte_tokenizer, lm_layers
from mmclin.models.mllm import MultimodalLM
from mmclin.tasks.qa import QACollator

VOCAB = 64
MEDIA = VOCAB - 1  # placeholder token id
PAD = 0
D_MEDIA = 16


def tiny_lm(family: str) -> nn.Module:
    """A 2-layer, 32-wide causal LM with random weights, in eval mode."""
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "bos_token_id": None, "eos_token_id": None, "pad_token_id": PAD}
    if family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    else:
        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
        config = config_class(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    return AutoModelForCausalLM.from_config(config).eval()


# ---------------------------------------------------------------- soft prompt


def spliced_batch(padding_side: str = "right"):
    """Two rows: row 0 has two media (3 and 1 valid tokens), row 1 one medium (2 tokens) and padding."""
    input_ids = torch.tensor([[5, 6, MEDIA, 7, MEDIA, 8, 9, 10], [5, MEDIA, 6, 7, 8, PAD, PAD, PAD]])
    attention_mask = (torch.arange(8) < torch.tensor([[8], [5]])).long()
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # answers: (9, 10) and (8,)
    labels[0, 6:], labels[1, 4] = torch.tensor([9, 10]), 8
    media = torch.randn(2, 2, 3, 32)
    media_mask = torch.tensor([[[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [0, 0, 0]]]).bool()
    return input_ids, attention_mask, labels, media, media_mask


def test_qa_collator_trains_on_the_answer_only():
    tok = byte_tokenizer()
    samples = [{"question": "Rhythm?", "answer": "sinus", "series": [torch.zeros(2, 8)]},
               {"question": "Is the axis deviated to the left?", "answer": "no", "series": [torch.zeros(2, 5)]}]
    batch = QACollator(tok, media_keys=("series",))(samples)
    labels, input_ids, attention_mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    for row, sample in enumerate(samples):
        trained = labels[row] != IGNORE_INDEX
        # the trained tokens are the answer and EOS as the text has them, ending at the row's last token
        assert torch.equal(labels[row][trained], input_ids[row][trained])
        assert tok.decode(labels[row][trained]) == f" {sample['answer']}{tok.eos_token}"
        assert trained.nonzero().max() == attention_mask[row].sum() - 1
    padding = attention_mask == 0
    assert padding[0].any() and (labels[padding] == IGNORE_INDEX).all()


def test_splice_media_interleaves_media_of_different_lengths():
    input_ids, attention_mask, labels, media, media_mask = spliced_batch()
    embed = nn.Embedding(VOCAB, 32)
    out = splice_media(input_ids, embed, MEDIA, media, media_mask, attention_mask, labels)
    # row 0: 8 tokens - 2 placeholders + 3 + 1 media tokens; row 1: 5 tokens - 1 placeholder + 2 media tokens
    assert out.inputs_embeds.shape == (2, 10, 32)
    assert out.attention_mask.tolist() == [[1] * 10, [1] * 6 + [0] * 4]
    assert out.position_ids[1, :6].tolist() == list(range(6))
    text = embed(input_ids).detach()
    row0 = out.inputs_embeds[0].detach()
    torch.testing.assert_close(row0[:2], text[0, :2])
    torch.testing.assert_close(row0[2:5], media[0, 0])
    torch.testing.assert_close(row0[5], text[0, 3])
    torch.testing.assert_close(row0[6], media[0, 1, 0])
    torch.testing.assert_close(row0[7:], text[0, 5:])
    torch.testing.assert_close(out.inputs_embeds[1, 1:3].detach(), media[1, 0, :2])
    # labels: -100 at media, prompt and padding; the answers moved by the media tokens inserted before them
    expected = torch.full((2, 10), IGNORE_INDEX)
    expected[0, 8:] = torch.tensor([9, 10])
    expected[1, 5] = 8
    assert torch.equal(out.labels, expected)

    as_lists = [[media[0, 0], media[0, 1, :1]], [media[1, 0, :2]]]
    from_lists = splice_media(input_ids, embed, MEDIA, as_lists, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(from_lists.inputs_embeds, out.inputs_embeds)

    left = splice_media(input_ids, embed, MEDIA, media, media_mask, attention_mask, labels, padding_side="left")
    assert left.attention_mask[1].tolist() == [0] * 4 + [1] * 6
    assert left.position_ids[1, 4:].tolist() == list(range(6))
    assert torch.equal(left.labels[1, 4:], expected[1, :6])
    torch.testing.assert_close(left.inputs_embeds[1, 4:], out.inputs_embeds[1, :6])


def test_splice_media_placeholder_mismatch_names_the_row():
    input_ids, attention_mask, labels, media, media_mask = spliced_batch()
    media_mask[1, 1, 0] = True  # row 1 now supplies two media for its one placeholder
    with pytest.raises(DataError, match=r"row 1: 1 media placeholder.*2 medium"):
        splice_media(input_ids, nn.Embedding(VOCAB, 32), MEDIA, media, media_mask, attention_mask, labels)


def test_soft_prompt_loss_is_over_answer_tokens_only():
    input_ids, attention_mask, labels, media, media_mask = spliced_batch()
    lm = tiny_lm("llama")
    out = splice_media(input_ids, lm.get_input_embeddings(), MEDIA, media, media_mask, attention_mask, labels)
    result = lm(
        inputs_embeds=out.inputs_embeds,
        attention_mask=out.attention_mask,
        position_ids=out.position_ids,
        labels=out.labels,
    )
    # Answer tokens sit at spliced positions 8, 9 (row 0) and 5 (row 1); each is predicted by the logit before it.
    rows, positions = torch.tensor([0, 0, 1]), torch.tensor([8, 9, 5])
    manual = F.cross_entropy(result.logits[rows, positions - 1], torch.tensor([9, 10, 8]))
    torch.testing.assert_close(result.loss, manual)


# ---------------------------------------------------------------- cross-attention

# Text with two media: medium 0 at position 2, medium 1 at position 5; row 1 is right-padded.
XATTN_IDS = torch.tensor([[3, 4, MEDIA, 6, 7, MEDIA, 9, 10, 11], [3, MEDIA, 5, 6, 7, MEDIA, 9, PAD, PAD]])
XATTN_MASK = (XATTN_IDS != PAD).long()
FIRST, SECOND = 2, 5  # placeholder positions in row 0


def media_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 2, 3, D_MEDIA) media tokens and their mask (row 1's second medium has 2 valid tokens)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = 3 * torch.randn(2, 2, 3, D_MEDIA, generator=generator)
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[1, 1, 2] = False
    return tokens, mask


def open_gates(fusion) -> None:
    with torch.no_grad():
        for block in fusion.blocks.values():
            block.alpha_attn.fill_(1.0)
            block.alpha_ff.fill_(1.0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cross_attention_sees_every_earlier_medium_and_each_identity(family):
    lm = tiny_lm(family)
    with torch.no_grad():
        bare = lm(XATTN_IDS, attention_mask=XATTN_MASK).logits
    fusion = attach_cross_attention(lm, D_MEDIA, every_n=1)
    assert sorted(fusion.blocks) == ["0", "1"]
    tokens, mask = media_batch()
    positions = placeholder_positions(XATTN_IDS, MEDIA, mask.any(-1), XATTN_MASK)
    assert positions[0].tolist() == [FIRST, SECOND]

    def logits(media_tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), fusion.media(media_tokens, mask, positions):
            return lm(XATTN_IDS, attention_mask=XATTN_MASK).logits

    # (a) gates at 0: the LM is unchanged
    torch.testing.assert_close(logits(tokens), bare, rtol=0, atol=0)

    open_gates(fusion)
    reference = logits(tokens)
    assert reference.isfinite().all()  # text before any medium attends to nothing, without NaN

    # (b) a new first medium changes the text after the second one, and nothing before the first
    changed_first = tokens.clone()
    changed_first[:, 0] = -tokens[:, 0]
    first = logits(changed_first)
    torch.testing.assert_close(first[0, :FIRST], reference[0, :FIRST])
    assert (first[0, SECOND + 1 :] - reference[0, SECOND + 1 :]).abs().amax(-1).min() > 1e-3

    changed_second = tokens.clone()
    changed_second[:, 1] = -tokens[:, 1]
    second = logits(changed_second)
    torch.testing.assert_close(second[0, :SECOND], reference[0, :SECOND])
    assert (second[0, SECOND:] - reference[0, SECOND:]).abs().amax(-1).min() > 1e-3

    # (d) two media placed together (both at SECOND) are told apart by slot: swapping them changes the text after
    # them, and would not without the medium-index embedding, since attention over a set of keys ignores order.
    together = torch.full_like(positions[:1], SECOND)

    def logits_together(media_tokens: torch.Tensor, media_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), fusion.media(media_tokens, media_mask, together):
            return lm(XATTN_IDS[:1], attention_mask=XATTN_MASK[:1]).logits[0]

    in_order = logits_together(tokens[:1], mask[:1])
    # Here no text sees the first medium alone, so only direct attention to it (not self-attention to text that
    # saw it) can carry a change of it to the text: the check a "latest medium only" mask fails.
    changed_first = tokens[:1].clone()
    changed_first[:, 0] = -tokens[:1, 0]
    assert (logits_together(changed_first, mask[:1])[SECOND:] - in_order[SECOND:]).abs().amax(-1).min() > 1e-3
    swapped = logits_together(tokens[:1].flip(1), mask[:1].flip(1))
    torch.testing.assert_close(swapped[:SECOND], in_order[:SECOND])
    assert (swapped[SECOND:] - in_order[SECOND:]).abs().amax(-1).min() > 1e-4
    with torch.no_grad():
        for block in fusion.blocks.values():
            block.medium_embed.weight.zero_()
    torch.testing.assert_close(
        logits_together(tokens[:1].flip(1), mask[:1].flip(1)), logits_together(tokens[:1], mask[:1])
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cross_attention_generate_with_cache_equals_without(family):
    lm = tiny_lm(family)
    fusion = attach_cross_attention(lm, D_MEDIA)
    open_gates(fusion)
    # Left padding for batched generation; no medium at position 0, so new tokens see media only if their
    # absolute positions are right.
    ids = torch.tensor([[3, 4, MEDIA, 6, MEDIA, 8], [PAD, PAD, 3, MEDIA, 5, MEDIA]])
    attention_mask = (ids != PAD).long()
    tokens, mask = media_batch()
    positions = placeholder_positions(ids, MEDIA, mask.any(-1), attention_mask)
    assert positions[1].tolist() == [1, 3]

    def generate(media_tokens: torch.Tensor, use_cache: bool):
        with torch.no_grad(), fusion.media(media_tokens, mask, positions):
            return lm.generate(
                ids,
                attention_mask=attention_mask,
                max_new_tokens=5,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=PAD,
                return_dict_in_generate=True,
                output_logits=True,
            )

    cached, uncached = generate(tokens, True), generate(tokens, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences.shape == (2, ids.shape[1] + 5)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits))
    # the media steer every decoding step, so the comparison above covers the cross-attention
    other = generate(-tokens, True)
    assert (torch.stack(other.logits) - torch.stack(cached.logits)).abs().amax(-1).min() > 1e-3


def test_cross_attention_every_n_trains_only_the_blocks():
    lm = tiny_lm("llama")
    lm.requires_grad_(False)
    fusion = attach_cross_attention(lm, D_MEDIA, every_n=2, n_heads=2)
    assert list(fusion.blocks) == ["1"]  # OpenFlamingo's convention: layers every_n-1, 2*every_n-1, ...
    tokens, mask = media_batch()
    positions = placeholder_positions(XATTN_IDS, MEDIA, mask.any(-1), XATTN_MASK)
    with fusion.media(tokens, mask, positions):
        lm(XATTN_IDS, attention_mask=XATTN_MASK, labels=XATTN_IDS).loss.backward()
    block = fusion.blocks["1"]
    assert block.alpha_attn.grad.abs() > 0 and block.alpha_ff.grad.abs() > 0  # gates at 0 still learn
    assert all(p.grad is None for p in lm.parameters())
    fusion.detach_hooks()
    with torch.no_grad(), fusion.media(tokens, mask, positions):
        open_gates(fusion)
        detached = lm(XATTN_IDS, attention_mask=XATTN_MASK).logits
    torch.testing.assert_close(detached, lm(XATTN_IDS, attention_mask=XATTN_MASK).logits.detach())


def test_gate_init_opens_the_attention_branch_and_lets_it_learn():
    lm = tiny_lm("llama")
    tokens, mask = media_batch()
    positions = placeholder_positions(XATTN_IDS, MEDIA, mask.any(-1), XATTN_MASK)
    closed = attach_cross_attention(lm, D_MEDIA, n_heads=2).blocks["0"]
    opened = attach_cross_attention(lm, D_MEDIA, n_heads=2, gate_init=0.5).blocks["0"]
    assert closed.alpha_attn.item() == 0.0 and opened.alpha_attn.item() == 0.5
    x = torch.randn(2, 9, 32)
    text_positions = torch.arange(9).expand(2, -1)
    for block in (closed, opened):
        block(x, text_positions, tokens, mask, positions).sum().backward()
    # Closed, the attention weights get no gradient (the saddle gate_init avoids); open, they do.
    assert closed.to_q.weight.grad.abs().max() == 0
    assert opened.to_q.weight.grad.abs().max() > 0


def test_block_channel_embedding_and_no_nan_for_text_before_media():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(d_model=32, d_media=D_MEDIA, n_heads=4, n_channels=3)
    with torch.no_grad():
        block.alpha_attn.fill_(1.0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    tokens, mask = media_batch()
    positions = placeholder_positions(XATTN_IDS, MEDIA, mask.any(-1), XATTN_MASK)
    text_positions = torch.arange(9).expand(2, -1)
    leads = torch.zeros(2, 2, 3, dtype=torch.long)
    out = block(x, text_positions, tokens, mask, positions, leads)
    other_leads = block(x, text_positions, tokens, mask, positions, leads + 1)
    assert (other_leads[0, FIRST:] - out[0, FIRST:]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(other_leads[:, :1], out[:, :1])  # position 0 sees no medium in either row
    out.sum().backward()
    assert all(p.grad.isfinite().all() for p in block.parameters() if p.grad is not None) and x.grad.isfinite().all()
    with pytest.raises(ValueError, match="n_channels=0"):
        GatedCrossAttentionBlock(32, D_MEDIA, 4)(x, text_positions, tokens, mask, positions, leads)
    with pytest.raises(ValueError, match="divisible"):
        GatedCrossAttentionBlock(30, D_MEDIA, 4)


def test_placeholder_and_layer_errors():
    tokens, mask = media_batch()
    ids = XATTN_IDS.clone()
    ids[1, 5] = 8  # row 1 loses its second placeholder
    with pytest.raises(DataError, match="row 1: 1 media placeholder"):
        placeholder_positions(ids, MEDIA, mask.any(-1), XATTN_MASK)

    class NoLayers(nn.Module):
        config = LlamaConfig(num_hidden_layers=3)

    with pytest.raises(ValueError, match="no nn.ModuleList of num_hidden_layers=3 layers"):
        lm_layers(NoLayers())
    assert len(lm_layers(tiny_lm("gpt2"))) == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cross_attention_fuse_generates_from_embeddings_as_from_ids(family):
    """MultimodalLM generates from the fused embeddings; with the KV cache that is generation from the token ids
    with the media set, new tokens only."""
    lm = tiny_lm(family)
    fusion = CrossAttentionFusion()
    fusion.attach(lm, D_MEDIA)
    open_gates(fusion)
    ids = torch.tensor([[3, 4, MEDIA, 6, MEDIA, 8], [PAD, PAD, 3, MEDIA, 5, MEDIA]])
    attention_mask = (ids != PAD).long()
    tokens, mask = media_batch()
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": PAD}

    def generate(media_tokens: torch.Tensor):
        media = MediaTokens(media_tokens, mask, mask.any(-1))
        with torch.no_grad(), fusion.fuse(lm, ids, attention_mask, media, MEDIA, padding_side="left") as fused:
            return lm.generate(inputs_embeds=fused.inputs_embeds, attention_mask=fused.attention_mask,
                               output_logits=True, return_dict_in_generate=True, **options)

    new = generate(tokens)
    with torch.no_grad(), fusion.media(tokens, mask, placeholder_positions(ids, MEDIA, mask.any(-1), attention_mask)):
        from_ids = lm.generate(ids, attention_mask=attention_mask, **options)[:, ids.shape[1]:]
    assert new.sequences.shape == (2, 5) and torch.equal(new.sequences, from_ids)
    # the media steer every decoding step through the fused call
    assert (torch.stack(generate(-tokens).logits) - torch.stack(new.logits)).abs().amax(-1).min() > 1e-3


# ---------------------------------------------------------------- the fusion contract


class PooledSumFusion(Fusion):
    """A third fusion, known to nothing in mmclin: each placeholder's embedding plus a learned gain times its
    medium's mean token; the text keeps its length. It records the padding side of every call."""

    def attach(self, lm: nn.Module, media_width: int) -> None:
        self.gain = nn.Parameter(torch.ones(media_width))
        self.calls: list[str] = []

    @contextlib.contextmanager
    def fuse(self, lm, input_ids, attention_mask, media, media_token_id, labels=None, padding_side="right"):
        self.calls.append(padding_side)
        valid = media.mask[..., None].to(media.tokens.dtype)
        pooled = (media.tokens * valid).sum(2) / valid.sum(2).clamp(min=1)  # (B, M, D)
        # the j-th placeholder of a row (row-major order) takes the row's j-th present medium
        rows, columns = ((input_ids == media_token_id) & attention_mask.bool()).nonzero(as_tuple=True)
        embeds = lm.get_input_embeddings()(input_ids)
        added = torch.zeros_like(embeds).index_put((rows, columns), self.gain * pooled[media.present])
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        yield FusedInputs(embeds + added, attention_mask, position_ids, labels)


def tiny_mllm(**settings) -> MultimodalLM:
    torch.manual_seed(0)
    encoder = PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=32, n_layers=1, n_heads=2)
    lm = {"tiny": {"hidden_size": 32, "intermediate_size": 64}, "freeze": "none"}
    return MultimodalLM({"series": encoder}, lm=lm, max_new_tokens=4, **settings)


def test_a_new_fusion_is_a_class_only_it_trains_a_step_and_generates(tmp_path):
    model = tiny_mllm(fusion=PooledSumFusion(), predictions_dir=str(tmp_path))
    assert "fusion.gain" in model.state_dict()  # saved and loaded with the model
    generator = torch.Generator().manual_seed(0)
    samples = [{"series": [torch.randn(1, 64, generator=generator)], "question": "Is the rhythm slow or fast?",
                "answer": answer, "choices": ["slow", "fast"]} for answer in ("slow", "fast")]
    loader = DataLoader(samples, batch_size=2, collate_fn=model.collator)
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, loader, loader)  # one training step, then validation: generation and choice ranking

    assert not torch.equal(model.fusion.gain.detach(), torch.ones(32))  # the fusion's parameter trained
    # training loss; validation loss, generation, choice scores
    assert model.fusion.calls == ["right", "right", "left", "right"]
    rows = [json.loads(line) for line in (tmp_path / "val-predictions/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["generated"], str) and r["ranked"] in ("slow", "fast") for r in rows)
    batch = model.collator(samples)
    media = model.batch_media(batch)
    blank = MediaTokens(torch.zeros_like(media.tokens), media.mask, media.present)
    with torch.no_grad():
        logits, blank_logits = (model.lm_forward(batch["input_ids"], batch["attention_mask"], m)[0].logits
                                for m in (media, blank))
    assert (logits - blank_logits).abs().max() > 1e-4  # the media reach the LM through the toy fusion


# Parameter names of one cross-attention block in checkpoints written before fusions were classes
OLD_BLOCK_KEYS = ["alpha_attn", "alpha_ff", "norm.weight", "norm.bias", "media_norm.weight", "media_norm.bias",
                  "to_q.weight", "to_kv.weight", "to_out.weight", "ff.0.weight", "ff.0.bias", "ff.1.fc1.weight",
                  "ff.1.fc2.weight", "medium_embed.weight"]


def test_the_deprecated_fusion_strings_build_the_same_model_with_a_warning():
    new_form = r"fusion: \{class_path: mmclin.fusion.CrossAttentionFusion, init_args: \{every_n: 2, gate_init: 0.5\}\}"
    with pytest.warns(DeprecationWarning, match=new_form):
        old = tiny_mllm(fusion="cross_attention", xattn_every_n=2, xattn_gate_init=0.5)
    new = tiny_mllm(fusion=CrossAttentionFusion(every_n=2, gate_init=0.5))
    assert isinstance(old.fusion, CrossAttentionFusion) and list(old.fusion.blocks) == ["1"]
    assert [k.removeprefix("fusion.blocks.1.") for k in new.state_dict() if k.startswith("fusion.")] == OLD_BLOCK_KEYS
    assert list(old.state_dict()) == list(new.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    new.load_state_dict(old.state_dict(), strict=True)  # an old checkpoint's weights
    assert float(new.fusion.blocks["1"].alpha_attn) == 0.5

    with pytest.warns(DeprecationWarning, match="write `fusion: mmclin.fusion.SoftPromptFusion`"):
        old = tiny_mllm(fusion="soft_prompt", xattn_every_n=1, xattn_gate_init=0.0)  # as old checkpoints record it
    new = tiny_mllm()
    assert isinstance(new.fusion, SoftPromptFusion) and list(old.state_dict()) == list(new.state_dict())
    assert not [k for k in new.state_dict() if k.startswith("fusion.")]
    with pytest.raises(ConfigError, match="xattn_gate_init: settings of the deprecated fusion: 'cross_attention'"):
        tiny_mllm(fusion=CrossAttentionFusion(), xattn_gate_init=0.5)
