"""TitansLM: causality of every variant, overfitting a batch, the layer pattern, parameters and FLOPs."""

import functools

import pytest
import torch
import torch.nn.functional as F
from run_helpers import bench_module
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.loss import causal_lm_loss
from titans.flops import _mean_causal_keys, training_flops_per_token
from titans.model import TitansConfig, TitansLM, count_parameters, num_parameters, parse_layer_pattern

VARIANTS = ["mac", "mag", "mal", "lmm", "swa", "full"]


def tiny_config(layers: str, **overrides) -> TitansConfig:
    kw = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, layers=layers, window=4, n_persistent=2,
              segment_len=8, memory_chunk=4, memory_depth=2, memory_hidden=16)
    kw.update(overrides)
    return TitansConfig(**kw)


@pytest.mark.parametrize(
    "layers,extra",
    [(v, {}) for v in VARIANTS] + [("mac", {"mac_memory_tokens": 3}), ("lmm*3,full", {"n_layers": 4})]
    + [("mac", {"mac_memory_input": kind}) for kind in ("attention", "input")],
)
def test_changing_future_tokens_leaves_past_logits_unchanged(layers, extra):
    torch.manual_seed(0)
    model = TitansLM(tiny_config(layers, **extra)).double()
    tokens = torch.randint(0, 64, (2, 21))
    logits, _ = model(tokens)
    for t in (1, 5, 8, 13, 20):
        changed = tokens.clone()
        changed[:, t:] = torch.randint(0, 64, changed[:, t:].shape)
        assert not torch.equal(changed, tokens)
        new_logits, _ = model(changed)
        assert torch.equal(new_logits[:, :t], logits[:, :t]), f"position < {t} saw the future"
        assert not torch.equal(new_logits[:, t:], logits[:, t:])  # the test can see a change


def test_swa_model_sees_only_its_window():
    """One SWA layer: position t's logits depend on tokens t−w+1..t only."""
    torch.manual_seed(0)
    model = TitansLM(tiny_config("swa", n_layers=1, window=4)).double()
    tokens = torch.randint(0, 64, (1, 16))
    logits, _ = model(tokens)
    changed = tokens.clone()
    changed[:, :8] = (changed[:, :8] + 1) % 64  # positions 0..7 lie outside the window of 11..15
    new_logits, _ = model(changed)
    assert torch.equal(new_logits[:, 11:], logits[:, 11:])
    assert not torch.equal(new_logits[:, 8:11], logits[:, 8:11])


@pytest.mark.parametrize("kind", ["mag", "mal"])
def test_memory_blocks_attend_through_the_configured_window(kind):
    model = TitansLM(tiny_config(kind, window=5))
    assert all(block.attn.window == 5 for block in model.blocks.values())


def test_state_carry_through_the_model_equals_one_call():
    torch.manual_seed(0)
    model = TitansLM(tiny_config("lmm")).double()
    tokens = torch.randint(0, 64, (2, 16))
    whole, _ = model(tokens)
    first, states = model(tokens[:, :8])
    second, _ = model(tokens[:, 8:], states)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-12, atol=1e-12)


def test_gradient_horizon_bounds_the_long_sequence_gradient():
    """The tiny MAC at 4,096 tokens (256 memory chunks, two layers): the exact gradient through every chunk
    grows by orders of magnitude towards the sequence start (the memory's update is gradient descent on a
    non-convex loss: some directions grow at every chunk); with the default horizon of 16 chunks it is
    flat. The forward pass is the same."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=257, dim=128, n_layers=2, n_heads=4, layers="mac", window=64, segment_len=64,
               n_persistent=4, memory_chunk=16)
    bounded = TitansLM(TitansConfig(**cfg))
    exact = TitansLM(TitansConfig(**cfg, memory_grad_horizon=None))
    exact.load_state_dict(bounded.state_dict())
    tokens = torch.randint(0, 257, (1, 4097), generator=torch.Generator().manual_seed(0))
    gradient_by_position = bench_module("state_gradient").gradient_by_position
    cut = gradient_by_position(bounded, tokens, bins=8)
    uncut = gradient_by_position(exact, tokens, bins=8)
    assert torch.isfinite(cut).all() and cut.max() < 30 * cut[-1]
    assert not torch.isfinite(uncut).all() or uncut[0] > 1e3 * uncut[-1]


@pytest.mark.parametrize("layers", VARIANTS)
def test_each_variant_overfits_one_batch(layers):
    torch.manual_seed(0)
    model = TitansLM(tiny_config(layers, n_heads=4, dim=64))
    tokens = torch.randint(0, 64, (2, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"{layers}: loss {losses[0]:.3f} → {losses[-1]:.3f}"


def test_chunked_loss_equals_full_cross_entropy_and_its_gradients():
    torch.manual_seed(0)
    model = TitansLM(tiny_config("mag")).double()
    tokens = torch.randint(0, 64, (2, 23))
    logits, _ = model(tokens[:, :-1])
    full = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    chunked = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:], chunk_tokens=5)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)  # float64 throughout
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(full, params), torch.autograd.grad(chunked, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = TitansLM(tiny_config("mac,mag")).double()
    tokens = torch.randint(0, 64, (2, 21))
    results = []
    for flag in (False, True, 2):  # off, every block, every second block
        model.checkpoint_blocks = flag
        loss = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:])
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    for loss, grads in results[1:]:
        torch.testing.assert_close(results[0][0], loss, rtol=0, atol=0)
        for a, b in zip(results[0][1], grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_keeps_memory_state_float32():
    model = TitansLM(tiny_config("mac"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, states = model(torch.randint(0, 64, (1, 16)))
    assert logits.dtype == torch.bfloat16
    assert all(w.dtype == torch.float32 for s in states for w in (*s.weights, *s.momentum))


@pytest.mark.parametrize("layers", VARIANTS)
def test_bf16_autocast_keeps_every_norm_on_its_fused_kernel(layers):
    """Every RMSNorm sees an input of its weight's dtype under bf16 autocast: a bf16 input with a float32
    weight makes rms_norm fall back to a slower composite (it warns once per process), as the output
    gate's norms did."""
    model = TitansLM(tiny_config(layers))
    mismatched = set()

    def check(name: str, module: nn.RMSNorm, args: tuple) -> None:
        if args[0].dtype != module.weight.dtype:
            mismatched.add(name)

    for name, module in model.named_modules():
        if isinstance(module, nn.RMSNorm):
            module.register_forward_pre_hook(functools.partial(check, name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (1, 16)))
    assert not mismatched


def test_layer_pattern():
    assert parse_layer_pattern("mac", 3) == ["mac"] * 3
    assert parse_layer_pattern("lmm*7,full", 16) == (["lmm"] * 7 + ["full"]) * 2
    assert parse_layer_pattern("MAG, swa", 4) == ["mag", "swa", "mag", "swa"]
    with pytest.raises(ValueError, match="does not divide"):
        parse_layer_pattern("lmm*7,full", 12)
    with pytest.raises(ValueError, match="bad item 'attn'"):
        parse_layer_pattern("mac,attn", 2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_heads"):
        TitansConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="segment_len"):
        TitansConfig(layers="mac", segment_len=100, memory_chunk=64)
    with pytest.raises(ValueError, match="memory_grad_horizon"):
        TitansConfig(memory_grad_horizon=0)
    with pytest.raises(ValueError, match="mac_memory_input=.output. is not one of residual, attention"):
        TitansConfig(mac_memory_input="output")
    for field, value, message in [("memory_max_grad_norm", 0.0, r"must be > 0 \(or null: no clipping\)"),
                                  ("memory_theta_max", -1.0, r"must be > 0 \(or null: 1/memory_chunk\)"),
                                  ("n_persistent", -1, "must be >= 0"), ("memory_depth", 0, "must be >= 1"),
                                  ("norm_eps", 0.0, "must be > 0"), ("memory_hidden", -4, "must be >= 1")]:
        with pytest.raises(ValueError, match=f"{field} {message}"):
            TitansConfig(**{field: value})


def test_mac_memory_input_is_what_the_memory_writes():
    """With the attention's output projection zeroed, y = 0: "residual" writes what "input" writes, and the
    memory state after a segment then equals; "attention" writes nothing but the norm of zero."""
    torch.manual_seed(0)
    models = {kind: TitansLM(tiny_config("mac", n_layers=1, mac_memory_input=kind)).double()
              for kind in ("residual", "input", "attention")}
    for model in models.values():
        model.load_state_dict(models["residual"].state_dict())
        nn.init.zeros_(model.blocks["0"].attn.to_out.weight)
    tokens = torch.randint(0, 64, (2, 16))
    states = {kind: model(tokens)[1][0] for kind, model in models.items()}
    for got, want in zip(states["input"].weights, states["residual"].weights, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(states["attention"].weights[0], states["residual"].weights[0])


def test_parameter_count_without_allocating():
    cfg = tiny_config("mac,mag,mal,lmm", n_layers=4)
    model = TitansLM(cfg)
    assert num_parameters(cfg) == count_parameters(model)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())  # tied head once
    untied = TitansLM(tiny_config("mac,mag,mal,lmm", n_layers=4, tie_embeddings=False))
    assert count_parameters(untied) == count_parameters(model) + 64 * 32


@pytest.mark.parametrize("layers,window", [("full", None), ("swa", 4)])
def test_attention_flops_match_an_independent_count(layers, window):
    """For attention-only models: 6 × matmul weights + 3 × 4·inner·keys per layer (QKᵀ and AV)."""
    seq = 16
    cfg = tiny_config(layers, n_persistent=0, tie_embeddings=False)
    model = TitansLM(cfg)
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    keys = sum(min(t + 1, window or seq) for t in range(seq)) / seq
    expected = 6 * matmul_weights + 3 * 4 * cfg.dim * keys * cfg.n_layers
    assert _mean_causal_keys(seq, window) == pytest.approx(keys)
    assert training_flops_per_token(cfg, seq) == pytest.approx(expected)


@pytest.mark.parametrize("layers,extra", [
    ("swa", {}), ("mac", {}), ("mac", {"mac_memory_tokens": 3}), ("mag", {}), ("mal", {}), ("lmm", {}),
    ("lmm", {"memory_depth": 3}),
])
def test_counted_flops_are_the_matmuls_a_forward_runs(layers, extra):
    """titans.flops' forward count, less what it counts that no matmul computes (attention scores, the
    memory's depthwise conv and per-chunk state update), is exactly what torch's FLOP counter sees the
    torch path's matmuls do: an MFU reported in training counts what runs, no more, no less."""
    seq = 32
    cfg = tiny_config(layers, n_layers=1, memory_kernel="torch", tie_embeddings=False, **extra)
    model = TitansLM(cfg)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, seq)))
    matmuls = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm")
    ran = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in matmuls) / seq

    half_segment = (cfg.segment_len + 1) / 2  # the segment's own keys and, per token, its memory tokens
    if layers == "mac":
        keys = cfg.n_persistent + (cfg.mac_memory_tokens or half_segment) + half_segment
    elif layers == "lmm":
        keys = 0
    else:
        keys = cfg.n_persistent + _mean_causal_keys(seq, cfg.window)
    scores = 2 * 2 * cfg.n_heads * cfg.head_dim * keys
    elementwise = 0.0
    if layers != "swa":
        memory = model.blocks["0"].memory
        h, d = cfg.memory_heads, cfg.memory_head_dim
        mlp = sum(w.numel() for w in memory.init_weights) / h  # one head's memory MLP
        elementwise = 2 * cfg.memory_conv_kernel * 3 * h * d + h * 5 * mlp / cfg.memory_chunk
    assert training_flops_per_token(cfg, seq) / 3 - scores - elementwise == pytest.approx(ran)


def test_memory_layers_count_their_test_time_training():
    swa = training_flops_per_token(tiny_config("swa"), 64)
    for kind in ("mag", "mal", "mac"):
        assert training_flops_per_token(tiny_config(kind), 64) > swa
