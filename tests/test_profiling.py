import json

import numpy as np
import pytest
import torch
from torch import nn

from moe_sieve.arch import ArchSpec, ExpertLayout, MoELayer, find_moe_layers, routing_from_tuple
from moe_sieve.data.calibration import make_batches, tokenize_example
from moe_sieve.data.tasks import Example
from moe_sieve.profiling import Profile, ProfileConfig, ProfileMismatchError, RoutingRecorder, profile_model
from moe_sieve.profiling.profiler import run_profile

from .conftest import build_tiny

TEXTS = [
    ("Question: 2 + 3 =", " 5"),
    ("", "A longer plain sentence about routing tokens to experts, with padding around it."),
    ("def f(x):", "\n    return x * 2"),
    ("Short", "!"),
    ("The cat sat on the", " mat and looked at the experts."),
]


def _tokenized(tokenizer):
    examples = [Example(p, c, f"mem:{i}") for i, (p, c) in enumerate(TEXTS)]
    return [tokenize_example(example, tokenizer, max_length=64) for example in examples]


def _profile(model, tokenizer, batch_size, count_tokens="all"):
    tokenized = _tokenized(tokenizer)
    batches = make_batches(
        tokenized, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, count_tokens=count_tokens
    )
    return profile_model(model, batches, len(tokenized), progress=False)


def _reference_counts(model, tokenizer):
    """Independent reference: router outputs of one unpadded example at a time, counted in Python."""
    layers = find_moe_layers(model)
    counts = np.zeros((len(TEXTS), len(layers), layers[0].num_experts), dtype=np.int64)
    mass = np.zeros(counts.shape, dtype=np.float64)
    captured = {}
    handles = [
        layer.router.register_forward_hook(
            lambda m, a, out, pos=pos, n=layer.num_experts: captured.__setitem__(pos, routing_from_tuple(out, n))
        )
        for pos, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for n, item in enumerate(_tokenized(tokenizer)):
                model(input_ids=torch.tensor([item.input_ids]))
                for pos, (index, weights) in captured.items():
                    if weights.shape[-1] != index.shape[-1]:
                        weights = weights.gather(-1, index)
                    for token_experts, token_weights in zip(index.tolist(), weights.tolist(), strict=True):
                        for expert, weight in zip(token_experts, token_weights, strict=True):
                            counts[n, pos, expert] += 1
                            mass[n, pos, expert] += weight
    finally:
        for handle in handles:
            handle.remove()
    return counts, mass


def test_counts_match_router_reference_and_sum_to_tokens_times_topk(tiny_family, byte_tokenizer):
    model = build_tiny(tiny_family)
    profile = _profile(model, byte_tokenizer, batch_size=2)
    ref_counts, ref_mass = _reference_counts(model, byte_tokenizer)
    assert profile.example_counts_NLE.shape == ref_counts.shape
    np.testing.assert_array_equal(profile.example_counts_NLE, ref_counts)
    np.testing.assert_allclose(profile.example_mass_NLE, ref_mass, rtol=1e-4, atol=1e-5)
    tokens = sum(len(t.input_ids) for t in _tokenized(byte_tokenizer))
    assert profile.tokens == tokens
    np.testing.assert_array_equal(profile.counts_LE.sum(1), np.full(len(profile.layer_ids), tokens * profile.top_k))


def test_padding_invariance(tiny_family, byte_tokenizer):
    model = build_tiny(tiny_family)
    one = _profile(model, byte_tokenizer, batch_size=1)
    padded = _profile(model, byte_tokenizer, batch_size=5)
    np.testing.assert_array_equal(one.example_counts_NLE, padded.example_counts_NLE)
    np.testing.assert_array_equal(one.counts_LE, padded.counts_LE)
    np.testing.assert_allclose(one.mass_LE, padded.mass_LE, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "batched_mm", "grouped_mm"])
def test_counts_do_not_depend_on_experts_backend(backend, byte_tokenizer):
    reference = _profile(build_tiny("olmoe", experts_implementation="eager"), byte_tokenizer, batch_size=2)
    other = _profile(build_tiny("olmoe", experts_implementation=backend), byte_tokenizer, batch_size=2)
    np.testing.assert_array_equal(reference.counts_LE, other.counts_LE)


def test_prompt_and_completion_counts_partition_all(byte_tokenizer):
    model = build_tiny("qwen2_moe")
    full = _profile(model, byte_tokenizer, 2, "all")
    prompt = _profile(model, byte_tokenizer, 2, "prompt")
    completion = _profile(model, byte_tokenizer, 2, "completion")
    np.testing.assert_array_equal(prompt.counts_LE + completion.counts_LE, full.counts_LE)
    assert 0 < prompt.tokens < full.tokens
    assert prompt.tokens + completion.tokens == full.tokens


class _HandExperts(nn.Module):
    """Stands in for a fused experts module: the recorder only looks at its inputs."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 2, 3))
        self.down_proj = nn.Parameter(torch.zeros(4, 3, 1))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return hidden_states


def _hand_layer(experts):
    return MoELayer(
        0, "moe", nn.Module(), "moe.gate", nn.Identity(), "moe.experts", experts, 4, 2, ExpertLayout("fused")
    )


def test_count_versus_mass_on_hand_made_routing():
    experts = _HandExperts()
    # batch of 2 sequences x 2 positions; position (1, 1) is padding
    mask_BT = torch.tensor([[True, True], [True, False]])
    index_TK = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 2]])
    weights_TK = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.6, 0.4]])
    recorder = RoutingRecorder([_hand_layer(experts)], ArchSpec("hand"))
    with recorder:
        recorder.begin_batch(mask_BT)
        experts(torch.zeros(4, 3), index_TK, weights_TK)
        counts_LBE, mass_LBE = recorder.end_batch()
    # sequence 0: tokens 0,1 -> experts {0:2, 1:1, 2:1}; sequence 1: token 2 -> {3:1, 0:1}; token 3 is padding
    assert counts_LBE[0].tolist() == [[2, 1, 1, 0], [1, 0, 0, 1]]
    np.testing.assert_allclose(mass_LBE[0].numpy(), [[1.1, 0.1, 0.8, 0.0], [0.5, 0.0, 0.0, 0.5]], atol=1e-6)
    # expert 0 leads by count (2 selections) but expert 2 carries more mass than expert 1 at equal count
    assert counts_LBE[0, 0, 1] == counts_LBE[0, 0, 2] and mass_LBE[0, 0, 2] > mass_LBE[0, 0, 1]


def test_dense_weights_and_expert_parallel_sentinels():
    experts = _HandExperts()
    index_TK = torch.tensor([[1, 4], [2, 1]])  # 4 == num_experts is an EP sentinel: not a real expert
    dense_TE = torch.tensor([[0.0, 0.7, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]])
    recorder = RoutingRecorder([_hand_layer(experts)], ArchSpec("hand"))
    with recorder:
        recorder.begin_batch(torch.ones(1, 2, dtype=torch.bool))
        experts(torch.zeros(2, 3), top_k_index=index_TK, top_k_weights=dense_TE)
        counts_LBE, mass_LBE = recorder.end_batch()
    assert counts_LBE[0, 0].tolist() == [0, 2, 1, 0]
    np.testing.assert_allclose(mass_LBE[0, 0].numpy(), [0.0, 0.95, 0.75, 0.0], atol=1e-6)


def test_recorder_refuses_token_count_mismatch():
    experts = _HandExperts()
    recorder = RoutingRecorder([_hand_layer(experts)], ArchSpec("hand"))
    with recorder, pytest.raises(RuntimeError, match="received 3 tokens for a batch of 4"):
        recorder.begin_batch(torch.ones(2, 2, dtype=torch.bool))
        experts(torch.zeros(3, 3), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert not experts._forward_pre_hooks


def test_profile_round_trip_subset_and_fit_checks(tmp_path, byte_tokenizer):
    model = build_tiny("mixtral")
    profile = _profile(model, byte_tokenizer, batch_size=2)
    path = profile.save(tmp_path / "prof")
    loaded = Profile.load(path)
    np.testing.assert_array_equal(loaded.counts_LE, profile.counts_LE)
    np.testing.assert_array_equal(loaded.example_counts_NLE, profile.example_counts_NLE)
    assert loaded.counts_LE.dtype == np.int64 and loaded.mass_LE.dtype == np.float32
    meta = json.loads((path / "profile.json").read_text())
    assert meta["num_experts"] == 8 and meta["top_k"] == 2 and meta["tokens"] == profile.tokens
    assert meta["model"]["config_fingerprint"] and meta["tool_version"] and meta["created"]

    with pytest.raises(FileExistsError, match="--overwrite"):
        profile.save(path)

    subset = loaded.subset(np.array([0, 3]))
    sub_tok = [t for i, t in enumerate(_tokenized(byte_tokenizer)) if i in (0, 3)]
    direct = profile_model(model, make_batches(sub_tok, batch_size=2, pad_token_id=0), 2, progress=False)
    np.testing.assert_array_equal(subset.counts_LE, direct.counts_LE)

    loaded.check_fits(type(loaded.shape)(tuple(loaded.layer_ids), 8, 2))
    with pytest.raises(ProfileMismatchError, match="8 vs 16 routed experts"):
        loaded.check_fits(type(loaded.shape)(tuple(loaded.layer_ids), 16, 2))
    with pytest.raises(ProfileMismatchError, match="MoE layers"):
        loaded.check_fits(type(loaded.shape)((1, 2), 8, 2))


def test_load_rejects_non_profile_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a moe-sieve profile"):
        Profile.load(tmp_path)


def test_run_profile_from_saved_model_and_local_jsonl(tmp_path, tiny_model_dir):
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    config = ProfileConfig(
        model=str(tiny_model_dir),
        data=str(data),
        batch_size=2,
        max_examples=4,
        count_tokens="completion",
        device="cpu",
    )
    profile = run_profile(config, progress=False)
    assert profile.num_examples == 4
    assert profile.metadata["data"]["count_tokens"] == "completion"
    assert profile.counts_LE.sum() == profile.tokens * profile.top_k * len(profile.layer_ids)


@pytest.mark.parametrize("family, expected", [("olmoe", 0.0), ("qwen2_moe", 2.0), ("deepseek_v3", 1.0)])
def test_shared_expert_equivalents_follow_the_config(family, expected, byte_tokenizer):
    # qwen2_moe tiny: shared_expert_intermediate_size 32 over moe_intermediate_size 16; deepseek_v3: 1 shared expert
    prof = _profile(build_tiny(family), byte_tokenizer, batch_size=5)
    assert prof.metadata["model"]["shared_expert_equivalents"] == expected
