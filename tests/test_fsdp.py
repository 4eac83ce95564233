"""FSDP (parallel.fsdp: torch's fully_shard over the data-parallel ranks) in 2-process CPU runs over gloo,
against the 1-process run on the same global batch: losses and weights, accumulation, activation
checkpointing, compiled blocks, bf16 autocast; exact resume; a checkpoint that is the dense run's, so a run
may switch FSDP on or off when it resumes. One launch for every job, with a deadline (tests/launcher.py).
Tensor, pipeline and sequence parallelism under FSDP are in tests/test_parallel.py's layouts.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from launcher import launch
from train_worker import base_overrides, one_process

from parallel.fsdp import full_optimizer_state, load_full_optimizer_state, shard_like
from pretrain.checkpoint import load_checkpoint, verify_checkpoint
from pretrain.checkpoint_shards import consolidate
from pretrain.config import ConfigError, load_config
from titans.model import num_parameters

WORKER = Path(__file__).with_name("train_worker.py")
WORLD = 2
MICRO_BATCH = 2  # per rank; the 1-process reference takes WORLD × MICRO_BATCH
LAUNCH_TIMEOUT_S = 400
FSDP = "parallel.fsdp=true"
SLICED = "parallel.fsdp_checkpoint=sharded"
RECALL = ("train.eval_tasks=mqar", "train.eval_task_samples=8")  # at every validation (steps 3 and 6)


def job(name: str, out: Path, *extra: str, **fields) -> dict:
    return {"name": name, "overrides": base_overrides(out, MICRO_BATCH) + [*extra], **fields}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """1-process runs on the global batch: plain, with 2 accumulated micro-batches, with bf16 autocast (alone
    and accumulated), with WORLD separate synthetic sequences a step, with MQAR recall measured at each
    validation."""
    return {"plain": one_process(tmp_path_factory.mktemp("plain"), WORLD * MICRO_BATCH),
            "accum": one_process(tmp_path_factory.mktemp("accum"), WORLD, "train.grad_accum=2"),
            "bf16": one_process(tmp_path_factory.mktemp("bf16"), WORLD * MICRO_BATCH, "train.precision=bf16"),
            "bf16_accum": one_process(tmp_path_factory.mktemp("bf16_accum"), WORLD, "train.grad_accum=2",
                                      "train.precision=bf16"),
            "separate": one_process(tmp_path_factory.mktemp("separate"), WORLD * MICRO_BATCH,
                                    f"data.synthetic_sequences={WORLD}"),
            "recall": one_process(tmp_path_factory.mktemp("recall"), WORLD * MICRO_BATCH, *RECALL)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    jobs = [job("fsdp", tmp / "fsdp", FSDP),
            job("first", tmp / "split", FSDP, "train.stop_after_steps=3"),  # then resumed in a new engine
            job("resumed", tmp / "split", FSDP),
            job("accum", tmp / "accum", FSDP, "data.batch_size=1", "train.grad_accum=2"),
            job("checkpointing", tmp / "ckpt", FSDP, "train.activation_checkpointing=true"),
            job("compiled", tmp / "compiled", FSDP, "train.compile=true", "train.compile_backend=aot_eager"),
            # bf16 autocast: blocks gathered in float32 (the 1-process run's weights), in bfloat16 (the
            # default under bf16), and with gradients reduce-scattered in bfloat16 too
            job("bf16", tmp / "bf16", FSDP, "train.precision=bf16", "parallel.fsdp_param_dtype=float32"),
            job("bf16_gather", tmp / "bf16_gather", FSDP, "train.precision=bf16"),
            job("bf16_reduce", tmp / "bf16_reduce", FSDP, "train.precision=bf16",
                "parallel.fsdp_reduce_dtype=bfloat16"),
            job("bf16_gather_accum", tmp / "bf16_gather_accum", FSDP, "train.precision=bf16",
                "data.batch_size=1", "train.grad_accum=2"),  # unsharded gradients accumulate in float32
            job("bf16_gather_compiled", tmp / "bf16_gather_compiled", FSDP, "train.precision=bf16",
                "train.compile=true", "train.compile_backend=aot_eager"),
            job("separate", tmp / "separate", FSDP, "data.synthetic_sequences=1"),  # two forwards a step
            # blocks freed after every forward, or kept gathered to their backward (and written in slices
            # after a validation, whose forwards leave them gathered)
            job("reshard_always", tmp / "reshard_always", FSDP, "parallel.fsdp_reshard=always"),
            job("reshard_never", tmp / "reshard_never", FSDP, "parallel.fsdp_reshard=never", SLICED),
            job("async", tmp / "async", FSDP, "train.async_checkpoint=true"),  # gathered, then written aside
            job("recall", tmp / "recall", FSDP, *RECALL),  # the model gathered for the evaluation
            job("nan", tmp / "nan", FSDP, nan_rank=1, nan_calls=[2]),  # rank 1's loss of step 2 is NaN
            # a DDP run's checkpoint resumed under FSDP, and an FSDP run's under DDP
            job("ddp_first", tmp / "to_fsdp", "train.stop_after_steps=3"),
            job("to_fsdp", tmp / "to_fsdp", FSDP),
            job("fsdp_first", tmp / "to_ddp", FSDP, "train.stop_after_steps=3"),
            job("to_ddp", tmp / "to_ddp"),
            # checkpoints of each rank's slices (parallel.fsdp_checkpoint=sharded): whole, split and
            # resumed, and resumed without FSDP
            job("sliced", tmp / "sliced", FSDP, SLICED),
            job("sliced_first", tmp / "sliced_split", FSDP, SLICED, "train.stop_after_steps=3"),
            job("sliced_resumed", tmp / "sliced_split", FSDP, SLICED),
            job("sliced_first_ddp", tmp / "sliced_to_ddp", FSDP, SLICED, "train.stop_after_steps=3"),
            job("sliced_to_ddp", tmp / "sliced_to_ddp"),
            job("sliced_async", tmp / "sliced_async", FSDP, SLICED, "train.async_checkpoint=true")]
    return launch(WORKER, jobs, tmp, WORLD, LAUNCH_TIMEOUT_S)


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


def assert_losses_close(got: list[float], want: list[float], rel: float = 1e-5) -> None:
    assert len(got) == len(want) == 6 and all(close(a, b, rel) for a, b in zip(got, want)), (got, want)


def assert_weights_close(checkpoint: str, reference: str) -> None:
    got, want = load_checkpoint(checkpoint)["model"], load_checkpoint(reference)["model"]
    assert set(got) == set(want), set(got) ^ set(want)
    for name, value in want.items():  # 6 AdamW steps from the same start on the same data
        assert not isinstance(got[name], torch.distributed.tensor.DTensor), name  # gathered, dense
        torch.testing.assert_close(got[name], value, rtol=0, atol=2e-5, msg=name)


def assert_same(got, want) -> None:
    """Equal structures with bitwise-equal tensors."""
    if torch.is_tensor(want):
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert set(got) == set(want), set(got) ^ set(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same(a, b)
    else:
        assert got == want


def test_fsdp_matches_one_process_on_the_same_global_batch(runs, references):
    got, reference = runs["fsdp"], references["plain"]
    assert_losses_close(got["losses"], reference.losses)
    for step, val in reference.val_losses.items():
        assert close(got["val_losses"][str(step)], val), (step, got["val_losses"], reference.val_losses)
    verify_checkpoint(got["checkpoint"])
    assert_weights_close(got["checkpoint"], reference.checkpoint)
    assert got["fused_loss_calls"] == 6  # the head's weight, read by the loss outside forward, is gathered


def test_fsdp_shards_every_parameter_over_the_ranks(runs):
    cfg = load_config(None, base_overrides(Path("unused"), MICRO_BATCH)).model
    per_rank = runs["fsdp"]["parameters_per_rank"]
    assert len(per_rank) == WORLD and max(per_rank) < num_parameters(cfg)
    assert num_parameters(cfg) <= sum(per_rank) <= num_parameters(cfg) + WORLD * 64  # (uneven dim-0 padding)


def test_fsdp_checkpoint_holds_the_dense_optimizer_state(runs, references):
    got = load_checkpoint(runs["fsdp"]["checkpoint"])["optimizer"]
    want = load_checkpoint(references["plain"].checkpoint)["optimizer"]
    assert got["param_groups"] == want["param_groups"] and set(got["state"]) == set(want["state"])
    for index, entry in want["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(got["state"][index][key], value, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name, reference, rel", [
    ("accum", "accum", 1e-5), ("checkpointing", "plain", 1e-5), ("compiled", "plain", 1e-5),
    ("bf16", "bf16", 1e-3), ("bf16_gather", "bf16", 1e-3), ("bf16_reduce", "bf16", 1e-3),
    ("bf16_gather_compiled", "bf16", 1e-3), ("bf16_gather_accum", "bf16_accum", 1e-3),
    ("separate", "separate", 1e-5)])
def test_fsdp_variants_match_one_process(runs, references, name, reference, rel):
    assert_losses_close(runs[name]["losses"], references[reference].losses, rel)


@pytest.mark.parametrize("name, gathered, reduced", [
    ("fsdp", "float32", "float32"), ("bf16", "float32", "float32"), ("bf16_gather", "bfloat16", "float32"),
    ("bf16_reduce", "bfloat16", "bfloat16")])
def test_fsdp_gathers_and_reduces_in_the_configured_dtypes(runs, name, gathered, reduced):
    moved = runs[name]["fsdp_bytes"]
    assert list(moved["gathered"]) == [gathered] and list(moved["reduced"]) == [reduced], moved
    if gathered == "bfloat16":  # the same elements in half the bytes
        assert moved["gathered"][gathered] * 2 == runs["bf16"]["fsdp_bytes"]["gathered"]["float32"]


def test_blocks_kept_gathered_to_their_backward_train_alike_on_fewer_gathers(runs, references):
    """parallel.fsdp_reshard: "never" gathers each block once a step, "default" (the run "fsdp") all but the
    last twice, "always" every block twice; the losses and the checkpoint (slices written after a
    validation) are the same."""
    gathered = {name: sum(runs[name]["fsdp_bytes"]["gathered"].values())
                for name in ("reshard_never", "fsdp", "reshard_always")}
    assert gathered["reshard_never"] < gathered["fsdp"] < gathered["reshard_always"], gathered
    for name in ("reshard_never", "reshard_always"):
        assert_losses_close(runs[name]["losses"], references["plain"].losses)
    got, want = consolidate(Path(runs["reshard_never"]["checkpoint"])), load_checkpoint(
        runs["fsdp"]["checkpoint"])["model"]
    assert set(got) == set(want) and all(got[k].shape == want[k].shape for k in want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=2e-5, msg=name)


def test_fsdp_checkpoints_written_in_the_background_equal_the_synchronous_ones(runs):
    got, want = runs["async"], runs["fsdp"]
    assert got["losses"] == want["losses"]
    for name in ("model", "optimizer"):  # every tensor, bitwise
        assert_same(load_checkpoint(got["checkpoint"])[name], load_checkpoint(want["checkpoint"])[name])


def test_sliced_checkpoints_written_in_the_background_equal_the_synchronous_ones(runs):
    got, want = (Path(runs[name]["checkpoint"]) / "shards" for name in ("sliced_async", "sliced"))
    for file in ("fsdp-tp0-pp0-dp0.pt", "fsdp-tp0-pp0-dp1.pt"):  # every slice, bitwise
        assert_same(*(torch.load(folder / file, weights_only=False) for folder in (got, want)))


def test_recall_while_training_under_fsdp_equals_one_process(runs, references):
    got, want = runs["recall"], references["recall"]
    assert_losses_close(got["losses"], want.losses)
    assert got["recall"] == {str(step): value for step, value in want.recall.items()}
    assert set(got["recall"]) == {"3", "6"} and "mqar/x2" in got["recall"]["3"]


def test_fsdp_resume_continues_bitwise(runs):
    assert runs["first"]["last_step"] == 3
    resumed, whole = runs["resumed"], runs["fsdp"]
    assert resumed["last_step"] == 6 and resumed["losses"] == whole["losses"]  # bitwise on CPU
    got, want = (load_checkpoint(r["checkpoint"])["model"] for r in (resumed, whole))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("first, second", [("ddp_first", "to_fsdp"), ("fsdp_first", "to_ddp")])
def test_a_run_switches_fsdp_on_or_off_when_it_resumes(runs, references, first, second):
    assert runs[first]["last_step"] == 3 and runs[second]["last_step"] == 6
    assert_losses_close(runs[second]["losses"], references["plain"].losses)
    assert_weights_close(runs[second]["checkpoint"], references["plain"].checkpoint)


def test_sliced_checkpoints_join_into_the_gathered_ones_and_resume(runs, references):
    """parallel.fsdp_checkpoint=sharded: each rank writes the slices it holds, nothing is gathered; joined
    (as every tool reads them) they are the gathered checkpoint's weights; a run resumes from them
    bitwise, and a run without FSDP resumes from them too."""
    ckpt = Path(runs["sliced"]["checkpoint"])
    verify_checkpoint(ckpt)
    files = sorted(f.name for f in (ckpt / "shards").iterdir())
    assert files == ["fsdp-tp0-pp0-dp0.pt", "fsdp-tp0-pp0-dp1.pt"]
    assert runs["sliced"]["losses"] == runs["fsdp"]["losses"]
    got, want = consolidate(ckpt), load_checkpoint(runs["fsdp"]["checkpoint"])["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert runs["sliced_first"]["last_step"] == 3
    assert runs["sliced_resumed"]["losses"] == runs["sliced"]["losses"]
    assert runs["sliced_to_ddp"]["last_step"] == 6
    assert_losses_close(runs["sliced_to_ddp"]["losses"], references["plain"].losses)
    assert_weights_close(runs["sliced_to_ddp"]["checkpoint"], references["plain"].checkpoint)


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(runs):
    got, clean = runs["nan"], runs["fsdp"]
    assert got["skipped_steps"] == 1 and math.isnan(got["losses"][1])
    assert got["losses"][0] == clean["losses"][0]
    assert all(math.isfinite(x) for i, x in enumerate(got["losses"]) if i != 1)


@pytest.mark.parametrize("override, message", [
    (["parallel.zero_stage=3"], "parallel.fsdp=true and parallel.zero_stage=3 both shard"),
    (["parallel.fsdp=false", "parallel.fsdp_shard=2"], "parallel.fsdp_shard=2 must be >= 0 and needs"),
    (["parallel.fsdp_param_dtype=float16"], "fsdp_param_dtype='float16': use float32, bfloat16, auto"),
    (["parallel.fsdp_reduce_dtype=auto"], "parallel.fsdp_reduce_dtype='auto': use float32, bfloat16"),
    (["parallel.fsdp_reshard=sometimes"], "parallel.fsdp_reshard='sometimes': use default, always or never"),
    (["parallel.fsdp_param_dtype=bfloat16", "train.precision=fp32"], "fsdp_param_dtype=bfloat16 needs train"),
])
def test_layouts_fsdp_cannot_run_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [FSDP, "model.n_layers=2", *override])


def test_gathering_in_bfloat16_under_float32_compute_is_refused_when_the_run_starts():
    from parallel.fsdp import precision_policy
    from parallel.mesh import LayoutError

    with pytest.raises(LayoutError, match="train.precision=auto is fp32 on a CPU"):
        precision_policy("bfloat16", "float32", "fp32")  # train.precision=auto, resolved on a CPU
    assert precision_policy("auto", "float32", "fp32").param_dtype is None  # as the shards hold them


def test_full_optimizer_state_round_trips_on_one_rank():
    """The gather / shard helpers on unsharded tensors (one process) are the identity."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = full_optimizer_state(optimizer, keep=True)
    fresh = torch.optim.AdamW(model.parameters())
    load_full_optimizer_state(fresh, state)
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(fresh.state_dict()["state"][index][key], value)
    assert shard_like(torch.ones(2), torch.zeros(2, dtype=torch.float64)).dtype == torch.float64


def test_planner_counts_fsdp_as_sharded_weights_plus_two_gathered_blocks():
    from parallel.plan import format_plan, plan, rank_memory

    overrides = ["parallel.zero_stage=0"]
    cfg = load_config("configs/paper/mac-1.3b.yaml", overrides)
    fsdp = load_config("configs/paper/mac-1.3b.yaml", [*overrides, FSDP])
    parameters, layers = 1_000_000, 10
    dense, sharded = (rank_memory(c, 8, parameters, layers, layers) for c in (cfg, fsdp))  # bf16 compute
    block = parameters / layers  # two gathered in bf16 (the default under bf16), one's gradients whole
    assert sharded["params"] == dense["params"] / 8 + 2 * 2 * block  # in bf16, reduced in fp32
    assert sharded["grads"] == dense["grads"] / 8 + (2 + 4) * block
    assert sharded["optim"] == dense["optim"] / 8
    fp32 = load_config("configs/paper/mac-1.3b.yaml", [*overrides, FSDP, "parallel.fsdp_param_dtype=float32"])
    assert rank_memory(fp32, 8, parameters, layers, layers)["params"] == dense["params"] / 8 + 2 * 4 * block
    assert rank_memory(fsdp, 8, parameters, layers, layers, value_bytes=4)["params"] == (  # fp32 compute
        dense["params"] / 8 + 2 * 4 * block)
    never = load_config("configs/paper/mac-1.3b.yaml", [*overrides, FSDP, "parallel.fsdp_reshard=never"])
    assert rank_memory(never, 8, parameters, layers, layers)["params"] == (  # every block kept to backward
        dense["params"] / 8 + 2 * parameters)
    assert format_plan(fsdp, *plan(fsdp, 8, "h100-80gb", 0.4)).startswith(
        "layout tp=1 pp=1 sp=1 dp=8 on 8 × h100-80gb, FSDP over 8 dp ranks, gathered in bf16,")
    hsdp = load_config("configs/paper/mac-1.3b.yaml", [*overrides, FSDP, "parallel.fsdp_shard=4"])
    assert rank_memory(hsdp, 8, parameters, layers, layers)["optim"] == dense["optim"] / 4


def test_a_large_gathered_checkpoint_is_noted_at_the_start_with_the_sliced_setting():
    from pretrain.config import ParallelConfig
    from pretrain.train import gathered_checkpoint_note

    fsdp = ParallelConfig(fsdp=True)
    note = gathered_checkpoint_note(fsdp, 8, 7_000_000_000)
    assert note.startswith("note: each checkpoint gathers 78 GiB of state into rank 0's host memory")
    assert "parallel.fsdp_checkpoint=sharded" in note
    assert gathered_checkpoint_note(fsdp, 8, 100_000_000) is None  # 1 GiB: nothing to say
    sliced = ParallelConfig(fsdp=True, fsdp_checkpoint="sharded")
    assert gathered_checkpoint_note(sliced, 8, 7_000_000_000) is None
    split = ParallelConfig(fsdp=True, tp=8, pp=2)  # rank 0 of each tp shard and stage gathers 5 GiB
    assert gathered_checkpoint_note(split, 8, 7_000_000_000) is None


def test_hsdp_replicas_share_the_writing_of_the_slices():
    from pretrain.checkpoint_shards import slice_written_by

    # 4 nodes of 8 ranks, sharded within a node: slice d written by node d mod 4, two slices a node
    writers = {d: [r for r in range(32) if slice_written_by(r, 8, 32) == d] for d in range(8)}
    assert writers == {d: [8 * (d % 4) + d] for d in range(8)}
    assert [slice_written_by(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]  # FSDP over every rank
    assert [slice_written_by(r, 2, 6) for r in range(6)] == [0, None, None, 1, None, None]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (bench/gpu_checks.sh runs it: step fsdp)"))])
def test_gathering_in_bfloat16_computes_the_model_with_bfloat16_weights(tmp_path, device):
    """One rank, FSDP gathering in bfloat16: the loss and every gradient are those of the same model with
    each weight rounded to bfloat16 under autocast, the embedding's rows upcast (the residual stream stays
    float32), the memory's state float32; the gradients reach the float32 shards unchanged."""
    import copy

    import torch.distributed as dist

    from parallel.fsdp import apply_fsdp, precision_policy
    from parallel.mesh import Mesh
    from pretrain.loss import CausalLMLoss
    from titans.model import TitansConfig, TitansLM

    torch.manual_seed(0)
    cfg = TitansConfig(vocab_size=61, dim=32, n_layers=4, n_heads=2, layers="mac,mag,mal,lmm", window=8,
                       n_persistent=2, segment_len=16, memory_chunk=8)
    model = TitansLM(cfg).to(device)
    rounded = copy.deepcopy(model).to(torch.bfloat16)
    rounded.embed.register_forward_hook(lambda module, inputs, out: out.float())
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), device=device)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = Mesh(dp_group=dist.group.WORLD, device=torch.device(device))
        policy = precision_policy("auto", "float32", "bf16")
        root = apply_fsdp(CausalLMLoss(model), model, mesh, policy=policy)
        states = []
        for module in (root, CausalLMLoss(rounded)):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = module(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            states.append((loss, {name: p.grad for name, p in module.model.named_parameters()}))
        (got, got_grads), (want, want_grads) = states
        assert torch.equal(got, want)
        for name, grad in want_grads.items():
            assert got_grads[name].dtype == torch.float32, name  # the shard's, reduced in float32
            assert torch.equal(got_grads[name].full_tensor(), grad.float()), name
    finally:
        dist.destroy_process_group()
