"""Soft-prompt and gated cross-attention fusion on tiny random LMs (Llama, Qwen2, GPT-2) built from configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from mmclin.errors import DataError
from mmclin.fusion.cross_attention import (
    GatedCrossAttentionBlock,
    attach_cross_attention,
    placeholder_positions,
)
from mmclin.fusion.soft_prompt import IGNORE_INDEX, answer_labels, splice_media
from mmclin.llm import lm_layers

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
    labels = answer_labels(input_ids, torch.tensor([6, 4]), attention_mask)  # answers: (9, 10) and (8,)
    media = torch.randn(2, 2, 3, 32)
    media_mask = torch.tensor([[[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [0, 0, 0]]]).bool()
    return input_ids, attention_mask, labels, media, media_mask


def test_answer_labels_mask_prompt_and_padding():
    input_ids, attention_mask, labels, _, _ = spliced_batch()
    expected = torch.full_like(input_ids, IGNORE_INDEX)
    expected[0, 6:] = torch.tensor([9, 10])
    expected[1, 4] = 8
    assert torch.equal(labels, expected)


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
