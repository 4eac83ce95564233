"""Streaming inference (titans/streaming.py): text fed in arbitrary pieces equals it fed whole, for every
block kind, and the cache does not grow with the text."""

from __future__ import annotations

import random
import re

import pytest
import torch

from titans.model import BLOCK_KINDS, TitansConfig, TitansLM
from titans.streaming import StreamCache, generate, next_token, stream_logits, stream_step

TRAIN_LEN = 32  # the length the tiny models below "train" at: the test scores 8× it


def tiny(layers: str, **overrides) -> TitansLM:
    torch.manual_seed(0)
    values = dict(vocab_size=41, dim=32, n_layers=2, n_heads=2, layers=layers, window=8, segment_len=8,
                  memory_chunk=4, n_persistent=2, mac_memory_tokens=0)
    values.update(overrides)
    return TitansLM(TitansConfig(**values)).double().eval()


def random_pieces(total: int, seed: int) -> list[int]:
    """Cuts at arbitrary places: mid-chunk, mid-segment, single tokens, longer than a segment."""
    rng, sizes = random.Random(seed), []
    while sum(sizes) < total:
        sizes.append(min(rng.choice([1, 1, 2, 3, 5, 9, 13, 31]), total - sum(sizes)))
    return sizes


@pytest.mark.parametrize("layers", [*BLOCK_KINDS, "mac,swa", "lmm,full"])
@pytest.mark.parametrize("memory_depth", [1, 2])
def test_pieces_equal_whole(layers: str, memory_depth: int) -> None:
    model = tiny(layers, memory_depth=memory_depth)
    tokens = torch.randint(0, 41, (2, 8 * TRAIN_LEN))
    with torch.no_grad():
        whole, _ = model(tokens)
    cache, outputs, at = None, [], 0
    for size in random_pieces(tokens.shape[1], seed=len(layers) + memory_depth):
        logits, cache = stream_step(model, tokens[:, at : at + size], cache)
        outputs.append(logits)
        at += size
    assert cache.seen == tokens.shape[1]
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole, rtol=0, atol=1e-9)


@pytest.mark.parametrize("layers, overrides", [
    ("mac", {"memory_conv_kernel": 1}), ("lmm", {"memory_chunk": 1}), ("mag", {"window": 1}),
    ("mac", {"mac_memory_input": "attention", "segment_len": 16}),  # four write chunks a segment
    ("mal,full,mac", {"segment_len": 16, "n_layers": 3}), ("mac,swa", {"memory_grad_horizon": 2}),
], ids=str)
def test_pieces_equal_whole_at_edge_settings(layers: str, overrides: dict) -> None:
    """No conv, one-token chunks, a one-token window, MAC segments of several chunks, mixed boundaries."""
    model = tiny(layers, **overrides)
    tokens = torch.randint(0, 41, (2, 100))
    with torch.no_grad():
        whole, _ = model(tokens)
    cache, outputs, at = None, [], 0
    for size in random_pieces(tokens.shape[1], seed=7):
        logits, cache = stream_step(model, tokens[:, at : at + size], cache)
        outputs.append(logits)
        at += size
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole, rtol=0, atol=1e-9)


def test_mac_with_probe_tokens_and_long_pieces() -> None:
    model = tiny("mac", mac_memory_tokens=3)
    tokens = torch.randint(0, 41, (1, 8 * TRAIN_LEN))
    with torch.no_grad():
        whole, _ = model(tokens)
    streamed, _ = stream_logits(model, tokens, piece_len=20)  # 20: not a multiple of the segment
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-9)


@pytest.mark.parametrize("layers", ["mac", "mag", "mal", "lmm", "swa"])
def test_cache_is_flat_in_the_text_length(layers: str) -> None:
    model = tiny(layers)
    sizes = []
    cache: StreamCache | None = None
    for _ in range(4):  # after 64, 128, 192, 256 tokens, each a multiple of every boundary
        _, cache = stream_step(model, torch.randint(0, 41, (1, 64)), cache)
        sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1, sizes
    assert all(layer.tail is None for layer in cache.layers)  # 64 tokens: every layer at a boundary


def test_full_attention_cache_grows() -> None:  # honest: a full-attention layer keeps every key
    model = tiny("full")
    _, short = stream_step(model, torch.randint(0, 41, (1, 16)))
    _, long = stream_step(model, torch.randint(0, 41, (1, 64)))
    assert long.nbytes() > short.nbytes()


@pytest.mark.parametrize("layers", ["swa", "full", "mag", "mal", "lmm,swa", "mac,mag", "mac"])
def test_a_new_token_runs_its_own_row(layers: str) -> None:
    """A generated token runs its own row through each block, from cached keys and values (a KV cache)
    and the committed memory: the window and the open chunk (MAC: segment) are not run again, except
    that each boundary runs the chunk or segment once for the memory's update (one more row a token,
    amortised). Each layer keeps its own boundary: a MAG beside MAC's longer segment too. (MAC's keys:
    its rows' and its memory tokens', each twice.)"""
    model = tiny(layers, memory_chunk=16, segment_len=32)  # MAC's segment: two of the MAG layer's chunks
    ffn_rows: list[int] = []
    key_rows: list[int] = []
    block = model.blocks["1" if "," in layers else "0"]
    block.ffn.register_forward_hook(lambda m, args, out: ffn_rows.append(args[0].shape[1]))
    block.attn.to_k.register_forward_hook(lambda m, args, out: key_rows.append(args[0].shape[1]))
    _, cache = stream_step(model, torch.randint(0, 41, (1, 64)))
    ffn_rows.clear()
    key_rows.clear()
    for token in torch.randint(0, 41, (32, 1, 1)):  # two whole chunks
        _, cache = stream_step(model, token, cache)
    assert sum(ffn_rows) / 32 <= 2, ffn_rows
    # keys: its own row as it runs and as it is cached; at a boundary the chunk's rerun and the w − 1 cached
    assert sum(key_rows) / 32 <= 4, key_rows


def test_mac_probe_tokens_stream_one_token_at_a_time() -> None:
    """MAC with N probe tokens: read once per segment from the memory at its start, cached for its rows."""
    model = tiny("mac", mac_memory_tokens=3, segment_len=16)
    tokens = torch.randint(0, 41, (2, 40))
    with torch.no_grad():
        whole, _ = model(tokens)
    cache, outputs = None, []
    for i in range(tokens.shape[1]):
        logits, cache = stream_step(model, tokens[:, i : i + 1], cache)
        outputs.append(logits)
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole, rtol=0, atol=1e-9)


def test_greedy_generation_equals_argmax_of_whole_sequence() -> None:
    model = tiny("mag")
    prompt = torch.randint(0, 41, (2, 11))
    out = generate(model, prompt, max_new_tokens=20)
    assert out.shape == (2, 31)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    torch.testing.assert_close(logits[:, 10:].argmax(-1), out[:, 11:])


def test_sampling_options() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert next_token(logits).item() == 2
    g = torch.Generator().manual_seed(0)
    draws = {next_token(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(50)}
    assert draws <= {2, 3}
    draws = {next_token(logits, temperature=1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {2}


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=1.0, top_k=0), "top-k must be >= 1, got 0"),
    (dict(temperature=1.0, top_p=1.5), "top-p must be in (0, 1], got 1.5"),
    (dict(top_p=0.9), "temperature 0 is greedy: set a temperature > 0"),  # would be ignored, not sampled
])
def test_sampling_settings_that_would_not_sample_as_asked_are_refused(settings, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(tiny("swa"), torch.randint(0, 41, (1, 5)), max_new_tokens=2, **settings)


def test_eos_stops_generation() -> None:
    model = tiny("swa")
    prompt = torch.randint(0, 41, (1, 5))
    with torch.no_grad():
        first = model(prompt)[0][0, -1].argmax().item()
    out = generate(model, prompt, max_new_tokens=10, eos_id=first)
    assert out.shape[1] == 6 and out[0, -1].item() == first


@pytest.mark.parametrize("layers", [*BLOCK_KINDS, "mal,full"])
def test_a_padded_batch_streams_each_row_as_if_alone(layers: str) -> None:
    """Rows of different lengths, left- and right-padded, then continued a few tokens at a time (a pad
    mid-stream too): every kept position's logits equal the row run alone; a dropped position carries its
    row's last kept logits; rows that have seen as many tokens run as one batch."""
    from titans.streaming import ragged_step

    model = tiny(layers)
    lengths, width = [19, 7, 19, 12], 19
    rows = [torch.randint(0, 41, (n + 6,), generator=torch.Generator().manual_seed(n + i))
            for i, n in enumerate(lengths)]
    tokens = torch.zeros(4, width, dtype=torch.long)
    keep = torch.zeros(4, width, dtype=torch.bool)
    for i, n in enumerate(lengths):  # rows 0, 1, 2 left-padded, row 3 right-padded
        span = slice(0, n) if i == 3 else slice(width - n, width)
        tokens[i, span], keep[i, span] = rows[i][:n], True
    logits, state = ragged_step(model, tokens, keep)
    assert sorted(len(members) for members, _ in state.groups) == [1, 1, 2]  # rows 0 and 2 as one batch
    steps = [(2, [True] * 4), (1, [True, False, True, True]), (3, [True] * 4)]  # row 1 skips a token
    seen, outputs = list(lengths), [(logits, keep)]
    for size, kept in steps:
        piece = torch.stack([rows[i][seen[i] : seen[i] + size] if kept[i] else torch.zeros(size).long()
                             for i in range(4)])
        mask = torch.tensor(kept)[:, None].expand(4, size)
        out, state = ragged_step(model, piece, mask, state)
        outputs.append((out, mask))
        seen = [s + size * k for s, k in zip(seen, kept, strict=True)]
    assert state.columns == width + 6
    for i in range(4):
        alone, _ = stream_logits(model, rows[i][: seen[i]][None])
        got = torch.cat([out[i][mask[i]] for out, mask in outputs])
        torch.testing.assert_close(got, alone[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(outputs[0][0][3, -1], outputs[0][0][3, 11])  # right padding: its last token's
    assert not outputs[0][0][1, 0].any()  # before a left-padded row's first token: zeros


def test_padded_rows_can_be_reordered_repeated_and_dropped() -> None:
    """`RowGroups.select` (beam search's reordering): a row continues the stream of the row it names."""
    from titans.streaming import ragged_step

    model = tiny("mac,mag")
    tokens = torch.randint(0, 41, (3, 10))
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[1, :4] = False
    _, state = ragged_step(model, tokens, keep)
    state = state.select([2, 1, 1])  # row 0 dropped, row 1 twice
    nxt = torch.randint(0, 41, (3, 3))
    out, _ = ragged_step(model, nxt, None, state)
    for j, source in enumerate([2, 1, 1]):
        alone, _ = stream_logits(model, torch.cat([tokens[source][keep[source]], nxt[j]])[None])
        torch.testing.assert_close(out[j], alone[0, -3:], rtol=0, atol=1e-9)


def test_generating_a_padded_batch_continues_each_prompt_as_alone() -> None:
    """`generate` with `keep`: prompts padded left and right, the prompt in pieces shorter than the padding
    (a right-padded row's last piece holds none of its tokens): each row continues as its prompt alone."""
    model = tiny("mac,mal")
    prompts = [torch.randint(0, 41, (n,), generator=torch.Generator().manual_seed(n)) for n in (23, 5, 14)]
    tokens, keep = torch.zeros(3, 23, dtype=torch.long), torch.zeros(3, 23, dtype=torch.bool)
    for row, (prompt, side) in enumerate(zip(prompts, ("left", "right", "left"), strict=True)):
        span = slice(0, len(prompt)) if side == "right" else slice(23 - len(prompt), 23)
        tokens[row, span], keep[row, span] = prompt, True
    out = generate(model, tokens, 9, keep=keep, piece_len=6)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], 9)
        assert out[row, 23:].tolist() == alone[0, len(prompt) :].tolist(), row
