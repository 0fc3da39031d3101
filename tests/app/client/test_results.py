"""Client result classes on result files written here, checked against torch computations."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from app.client import (
    ChgResult,
    Result,
    ScoreResult,
    TraceResult,
    load_result,
)
from app.client.results import ROLE_CODES


def result_file(tmp_path, kind, tensors, *, params=None, summary=None, name="r.safetensors"):
    path = tmp_path / name
    metadata = {
        "job_id": "f" * 32,
        "kind": kind,
        "model": "demo",
        "params": json.dumps(params or {}),
        "summary": json.dumps(summary or {}),
    }
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    return path


def test_importing_the_client_loads_no_heavy_library():
    code = (
        "import sys, app.client\n"
        "print([m for m in ('torch', 'transformers', 'fastapi', 'pandas') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Mean gates per head, chosen so that each consensus role appears: (G+, G−) → role.
ROLE_GATES = {
    (0, 0): (0.9, 0.8, "facilitating"),
    (0, 1): (0.9, 0.1, "irrelevant"),
    (1, 0): (0.2, 0.1, "interfering"),
    (1, 1): (0.3, 0.7, "inconsistent"),
    (2, 0): (0.6, 0.55, "facilitating"),
    (2, 1): (0.45, 0.2, "interfering"),
}


def chg_tensors(num_masks=3, seed=0):
    """Gates whose mask means are ROLE_GATES, but individual masks spread around them."""
    rng = np.random.default_rng(seed)
    g_plus = np.zeros((num_masks, 3, 2), np.float32)
    g_minus = np.zeros((num_masks, 3, 2), np.float32)
    for (layer, head), (gp, gm, _) in ROLE_GATES.items():
        for gates, mean in ((g_plus, gp), (g_minus, gm)):
            noise = rng.uniform(-0.04, 0.04, num_masks)
            noise -= noise.mean()
            gates[:, layer, head] = mean + noise
    return {
        "masks.none": rng.uniform(0, 1, (num_masks, 3, 2)).astype(np.float32),
        "masks.positive": g_plus,
        "masks.negative": g_minus,
        "nll.none": np.linspace(3, 1, 5, dtype=np.float32),
        "nll.positive": np.linspace(1, 0.9, 4, dtype=np.float32),
        "nll.negative": np.linspace(1, 1.5, 4, dtype=np.float32),
    }


def test_chg_taxonomy_follows_the_paper_table(tmp_path):
    result = ChgResult.load(result_file(tmp_path, "chg", chg_tensors()), tensors="numpy")
    expected = {
        role: sorted(h for h, (_, _, r) in ROLE_GATES.items() if r == role)
        for role in ("facilitating", "interfering", "irrelevant", "inconsistent")
    }
    assert result.facilitating_heads() == expected["facilitating"]
    assert result.interfering_heads() == expected["interfering"]
    assert result.irrelevant_heads() == expected["irrelevant"]
    assert result.inconsistent_heads() == expected["inconsistent"]
    mask = result.get_facilitating_mask()
    assert mask.dtype == np.float32 and mask.shape == (3, 2)
    assert {tuple(int(i) for i in ix) for ix in np.argwhere(mask == 1)} == set(
        expected["facilitating"]
    )
    assert result.summary()["roles"] == {
        "irrelevant": 1,
        "facilitating": 2,
        "interfering": 2,
        "inconsistent": 1,
        "undetermined": 0,
    }
    assert result.summary()["final_nll"] == pytest.approx(
        {"none": 1.0, "positive": 0.9, "negative": 1.5}
    )
    assert result.shape == (3, 3, 2)


def test_chg_per_mask_role_counts_match_a_loop(tmp_path, monkeypatch):
    tensors = chg_tensors(num_masks=4, seed=1)
    path = result_file(tmp_path, "chg", tensors, params={"threshold": 0.5})
    monkeypatch.setitem(sys.modules, "pandas", None)  # the no-pandas path: plain records
    records = ChgResult.load(path, tensors="numpy").head_taxonomy()
    assert isinstance(records, list) and len(records) == 6
    gp, gm = tensors["masks.positive"], tensors["masks.negative"]
    for row in records:
        layer, head = row["layer"], row["head"]
        fac = sum(gm[m, layer, head] >= 0.5 for m in range(4))
        inter = sum(1 - gp[m, layer, head] >= 0.5 for m in range(4))
        irr = sum(gp[m, layer, head] * (1 - gm[m, layer, head]) >= 0.5 for m in range(4))
        assert (row["facilitating_masks"], row["interfering_masks"], row["irrelevant_masks"]) == (
            fac,
            inter,
            irr,
        )
        assert row["role"] == ROLE_GATES[(layer, head)][2]
        assert row["g_plus"] == pytest.approx(ROLE_GATES[(layer, head)][0], abs=1e-6)


def test_chg_dataframes_and_the_servers_taxonomy(tmp_path):
    pd = pytest.importorskip("pandas")
    tensors = chg_tensors()
    result = ChgResult.load(result_file(tmp_path, "chg", tensors), tensors="numpy")
    frame = result.head_taxonomy()
    assert isinstance(frame, pd.DataFrame) and list(frame["role"])[:2] == [
        "facilitating",
        "irrelevant",
    ]
    long = result.to_dataframe()
    assert len(long) == 3 * 3 * 3 * 2
    row = long[
        (long.stage == "negative") & (long["mask"] == 2) & (long.layer == 1) & (long["head"] == 0)
    ]
    assert row.gate.item() == pytest.approx(float(tensors["masks.negative"][2, 1, 0]))
    # When the file holds the server's taxonomy, that is what the result reports.
    server = np.zeros((3, 2), np.int8)
    server[2, 1] = 1
    tensors["taxonomy"] = server
    stored = ChgResult.load(result_file(tmp_path, "chg", tensors, name="t.safetensors"))
    assert stored.facilitating_heads() == [(2, 1)]


def test_chg_seed_surface_necessary_and_sufficient_heads(tmp_path):
    tensors = chg_tensors(num_masks=3)
    tensors["masks.negative"][1, 0, 1] = 0.9  # one mask keeps an irrelevant head
    result = ChgResult.load(result_file(tmp_path, "chg", tensors), tensors="numpy")
    assert (result.num_masks, result.num_layers, result.num_heads) == (3, 3, 2)
    # Sufficient: G- ≥ threshold (mask-averaged, as the seed averages; or one mask).
    assert result.sufficient_heads() == [(0, 0), (1, 1), (2, 0)]
    assert result.sufficient_heads(mask_idx=1) == [(0, 0), (0, 1), (1, 1), (2, 0)]
    assert result.sufficient_heads(threshold=0.75) == [(0, 0)]
    # Necessary: kept under both pressures (the paper's facilitating heads).
    assert result.necessary_heads() == [(0, 0), (2, 0)]
    assert result.necessary_heads(mask_idx=1) == [(0, 0), (0, 1), (2, 0)]
    assert result.necessary_heads(threshold=0.85) == []


def test_chg_consensus_from_per_mask_roles_with_agreement(tmp_path):
    tensors = chg_tensors(num_masks=4)
    g_plus, g_minus = tensors["masks.positive"], tensors["masks.negative"]
    g_plus[:, 0, 1], g_minus[:, 0, 1] = 0.6, 0.4  # no score reaches 0.5 in any mask
    g_minus[:2, 2, 0] = 0.1  # facilitating in two masks of four only
    signal = np.full(g_plus.shape, 5.0, np.float32)
    signal[:, 1, 0] = 0.5  # interfering, but the loss never pulled on its gate
    tensors["gate_signal"] = signal
    result = ChgResult.load(result_file(tmp_path, "chg", tensors), tensors="numpy")
    roles = result.taxonomy
    assert roles[0, 0] == ROLE_CODES["facilitating"]
    assert roles[0, 1] == roles[1, 0] == roles[2, 0] == ROLE_CODES["undetermined"]
    assert result.undetermined_heads() == [(0, 1), (1, 0), (2, 0)]
    agreement = result.taxonomy_agreement
    assert agreement[0, 0] == 1.0 and agreement[2, 1] == 1.0
    assert agreement[2, 0] == 0.0  # two masks facilitating, two irrelevant: none without a role
    assert result.mask_roles.shape == (4, 3, 2)
    assert result.summary()["roles"]["undetermined"] == 3


def test_chg_threshold_comes_from_the_job_params(tmp_path):
    path = result_file(tmp_path, "chg", chg_tensors(), params={"threshold": 0.7})
    result = ChgResult.load(path, tensors="numpy")
    # With 0.7 only head (0, 0) keeps both mean gates above threshold.
    assert result.facilitating_heads() == [(0, 0)]
    assert result.threshold == 0.7


def score_tensors(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)
    return {
        "logits": logits,
        "input_ids": rng.integers(0, 11, (2, 5)).astype(np.int64),
        "attention_mask": mask,
    }


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_score_derivations_match_torch(tmp_path, backend):
    tensors = score_tensors()
    result = ScoreResult.load(result_file(tmp_path, "score", tensors), tensors=backend)
    t_logits = torch.from_numpy(tensors["logits"])
    expected_lp = torch.log_softmax(t_logits.double(), dim=-1).float()

    def as_torch(x):
        return x if backend == "torch" else torch.from_numpy(np.asarray(x))

    assert isinstance(result.logits, torch.Tensor if backend == "torch" else np.ndarray)
    torch.testing.assert_close(as_torch(result.log_probs), expected_lp)
    torch.testing.assert_close(as_torch(result.probs), torch.softmax(t_logits, -1))
    finals = t_logits[[0, 1], [4, 2]]  # last real token: 5 and 3 tokens
    torch.testing.assert_close(as_torch(result.final_token_logits()), finals)
    torch.testing.assert_close(
        as_torch(result.final_token_log_probs()), torch.log_softmax(finals, -1)
    )
    torch.testing.assert_close(as_torch(result.final_token_probs()), torch.softmax(finals, -1))
    ids = torch.from_numpy(tensors["input_ids"])
    torch.testing.assert_close(
        as_torch(result.gather_log_probs(ids)),
        expected_lp.gather(-1, ids[..., None]).squeeze(-1),
    )


def test_score_final_token_only(tmp_path):
    finals = np.arange(22, dtype=np.float32).reshape(2, 11) / 7
    tensors = {
        "final_token_logits": finals,
        "input_ids": np.zeros((2, 3), np.int64),
        "attention_mask": np.ones((2, 3), np.int64),
    }
    result = ScoreResult.load(result_file(tmp_path, "score", tensors), tensors="numpy")
    np.testing.assert_allclose(
        result.final_token_probs(), torch.softmax(torch.from_numpy(finals), -1).numpy(), rtol=1e-6
    )
    with pytest.raises(KeyError, match="final_token_only"):
        _ = result.logits


def trace_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "attn_o_proj_pre.0": rng.normal(size=(1, 4, 8)).astype(np.float32),
        "attn_o_proj_pre.1": rng.normal(size=(1, 4, 8)).astype(np.float32),
        "logits.0": rng.normal(size=(1, 4, 13)).astype(np.float32),
        "final_norm": rng.normal(size=(1, 4, 8)).astype(np.float32),
        "final_logits": rng.normal(size=(1, 4, 13)).astype(np.float32),
        "input_ids": np.array([[1, 2, 3, 4]], np.int64),
        "attention_mask": np.ones((1, 4), np.int64),
    }


def test_trace_access_and_logit_lens(tmp_path):
    tensors = trace_tensors()
    path = result_file(tmp_path, "trace", tensors, summary={"tokens": [["a", "b", "c", "d"]]})
    trace = TraceResult.load(path, tensors="numpy")
    assert trace.available_sites == ["attn_o_proj_pre", "final_norm", "logits"]
    assert trace.layers("attn_o_proj_pre") == [0, 1]
    assert trace.has("attn_o_proj_pre", 1) and not trace.has("attn_o_proj_pre", 2)
    assert trace.has("final_norm") and not trace.has("mlp_output", 0)
    np.testing.assert_array_equal(trace.get("attn_o_proj_pre", 1), tensors["attn_o_proj_pre.1"])
    np.testing.assert_array_equal(trace.get("final_norm"), tensors["final_norm"])
    np.testing.assert_array_equal(trace.final_logits, tensors["final_logits"])
    assert trace.tokens == [["a", "b", "c", "d"]]
    with pytest.raises(KeyError, match="give a layer"):
        trace.get("attn_o_proj_pre")
    with pytest.raises(KeyError, match=r"layer 5 .* \(traced: \[0, 1\]\)"):
        trace.get("attn_o_proj_pre", 5)
    with pytest.raises(KeyError, match="was not traced"):
        trace.get("mlp_output", 0)
    np.testing.assert_allclose(
        trace.final_log_probs(),
        torch.log_softmax(torch.from_numpy(tensors["final_logits"]), -1).numpy(),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        trace.layer_probs(0),
        torch.softmax(torch.from_numpy(tensors["logits.0"]), -1).numpy(),
        atol=1e-6,
    )
    with pytest.raises(KeyError, match="layer 1 of 'logits'"):
        trace.layer_probs(1)


def test_every_stored_dtype_reads_like_safetensors_does(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(2, 3)).astype(np.float32),
        "f16": rng.normal(size=(3,)).astype(np.float16),
        "f64": rng.normal(size=(2,)),
        "i64": np.array([-(2**40), 7], np.int64),
        "i32": np.array([[-5, 2**30]], np.int32),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "bool": np.array([True, False]),
    }
    path = result_file(tmp_path, "score", tensors)
    expected = safetensors.numpy.load_file(str(path))
    loaded = Result.load(path, tensors="numpy")
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)


def test_bfloat16_widens_for_numpy_and_stays_exact_for_torch(tmp_path):
    values = torch.randn(3, 5).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    metadata = {"kind": "trace", "params": "{}", "summary": "{}"}
    safetensors.torch.save_file({"block_input.0": values}, str(path), metadata=metadata)
    as_numpy = TraceResult.load(path, tensors="numpy").get("block_input", 0)
    assert as_numpy.dtype == np.float32
    np.testing.assert_array_equal(as_numpy, values.float().numpy())
    as_torch = TraceResult.load(path, tensors="torch").get("block_input", 0)
    assert as_torch.dtype == torch.bfloat16 and torch.equal(as_torch, values)


def test_load_result_dispatches_on_kind_and_rejects_other_files(tmp_path):
    chg = result_file(tmp_path, "chg", chg_tensors(), name="c.safetensors")
    assert type(load_result(chg)) is ChgResult
    assert type(load_result(chg.read_bytes())) is ChgResult
    with pytest.raises(ValueError, match="needs a score result; this file holds 'chg'"):
        ScoreResult.load(chg)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_result(junk)
    result = load_result(chg, tensors="torch")
    assert result.job_id == "f" * 32 and result.model == "demo"
    assert isinstance(result.masks["positive"], torch.Tensor)
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        result["nope"]
