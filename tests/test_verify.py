"""Verify: a compiled checkpoint passes against its forced-routing original, and a wrong one fails."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

import tiny
from checkpoints import save_family, spread_plan
from premoe.compile import compile_checkpoint
from premoe.data import Source
from premoe.errors import InputError
from premoe.verify import verify

TEXT = [Source("text", [tiny.TEXT], "tiny")]


def compiled(family, tmp_path, **kwargs):
    path, model, adapter = save_family(family, tmp_path / "src")
    plan = kwargs.pop("plan", None) or spread_plan(path, model, adapter)
    compile_checkpoint(path, plan, tmp_path / "out", progress=False, **kwargs)
    return path, tmp_path / "out", adapter, model


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_compiled_checkpoint_passes(family, tmp_path):
    path, out, adapter, model = compiled(family, tmp_path)
    report = verify(path, out, TEXT, max_tokens=256, seq_len=32, progress=False)
    assert report.passed and report.max_abs_diff <= 1e-5
    check = report.domains[0]
    assert check.tokens == check.windows * 31 > 0
    assert math.isfinite(check.ppl_original) and math.isfinite(check.ppl_compiled)
    assert check.kl > 0 and check.max_abs_diff_full > 1e-3  # pruning changed the model; the metrics see it
    assert report.gate_changes == adapter.gate_changes_when_pruned(model.config)
    assert ("without top-k renormalisation" in report.summary()) == report.gate_changes
    assert "PASS" in report.summary()
    assert json.loads(json.dumps(report.to_json()))["passed"] is True


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_streaming_verify_gives_the_in_memory_numbers(family, tmp_path):
    path, out, adapter, model = compiled(family, tmp_path)
    source = [Source("text", [tiny.TEXT], "tiny"), Source("more", [tiny.TEXT[::-1]], "tiny")]
    memory = verify(path, out, source, max_tokens=160, seq_len=32, batch_size=2, progress=False)
    streamed = verify(path, out, source, max_tokens=160, seq_len=32, batch_size=2, progress=False, stream=True)
    assert streamed.passed and memory.passed
    for a, b in zip(memory.domains, streamed.domains):
        assert (a.name, a.windows, a.tokens, a.tie_flips, a.excluded) == (b.name, b.windows, b.tokens, b.tie_flips,
                                                                          b.excluded)
        assert a.ppl_original == pytest.approx(b.ppl_original, rel=1e-5)
        assert a.ppl_compiled == pytest.approx(b.ppl_compiled, rel=1e-5)
        assert a.kl == pytest.approx(b.kl, rel=1e-3, abs=1e-7)
        assert a.max_abs_diff_full == pytest.approx(b.max_abs_diff_full, rel=1e-3, abs=1e-5)
        assert b.max_abs_diff <= 1e-5


def test_tied_embeddings_survive_the_layer_by_layer_loads(tmp_path):
    from premoe.adapters import prune_in_memory
    from premoe.bank import ExpertBank
    from premoe.modeling import load_model

    path, model, adapter = save_family("qwen3_moe", tmp_path / "src", overrides={"tie_word_embeddings": True})
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    plan = spread_plan(path, model, adapter)
    compile_checkpoint(path, plan, tmp_path / "out", progress=False)
    memory = verify(path, tmp_path / "out", TEXT, max_tokens=128, seq_len=32, progress=False)
    streamed = verify(path, tmp_path / "out", TEXT, max_tokens=128, seq_len=32, progress=False, stream=True)
    assert memory.passed and streamed.passed
    assert streamed.domains[0].ppl_original == pytest.approx(memory.domains[0].ppl_original, rel=1e-6)
    bank = ExpertBank(path, plan.kept, cache=None)
    assert bank.model.lm_head.weight.data_ptr() == bank.model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(1, tiny.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = prune_in_memory(load_model(path), adapter, plan.kept)(ids).logits
        assert torch.allclose(bank.model(ids).logits, want, rtol=0, atol=1e-5)


def test_streaming_verify_fails_a_wrong_checkpoint_and_refuses_a_compact_one(tmp_path):
    path, out, adapter, model = compiled("qwen3_moe", tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["premoe"]["kept_experts"]["1"] = [e for e in range(8) if e not in config["premoe"]["kept_experts"]["1"]]
    (out / "config.json").write_text(json.dumps(config))
    assert not verify(path, out, TEXT, max_tokens=128, seq_len=32, progress=False, stream=True).passed
    plan = spread_plan(path, model, adapter, kept={0: [0, 3, 5], 1: [1, 2, 4, 6, 7]})
    compile_checkpoint(path, plan, tmp_path / "compact", export="compact", progress=False)
    with pytest.raises(InputError, match="compact export"):
        verify(path, tmp_path / "compact", TEXT, progress=False, stream=True)


def test_gate_change_is_reported_for_qwen2_moe(tmp_path):
    path, out, adapter, model = compiled("qwen2_moe", tmp_path)
    assert adapter.gate_changes_when_pruned(model.config)  # the family this test is about
    report = verify(path, out, TEXT, max_tokens=128, seq_len=32, progress=False)
    assert report.gate_changes and report.notes


def test_wrong_checkpoint_fails(tmp_path):
    path, out, adapter, model = compiled("qwen3_moe", tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["premoe"]["kept_experts"]["1"] = [e for e in range(8) if e not in config["premoe"]["kept_experts"]["1"]]
    (out / "config.json").write_text(json.dumps(config))  # claims other experts than the shards hold
    report = verify(path, out, TEXT, max_tokens=128, seq_len=32, progress=False)
    assert not report.passed and "FAIL" in report.summary()


def test_compact_export_verifies(tmp_path):
    path, model, adapter = save_family("qwen3_moe", tmp_path / "src")
    plan = spread_plan(path, model, adapter, kept={0: [0, 3, 5], 1: [1, 2, 4, 6, 7]})
    compile_checkpoint(path, plan, tmp_path / "out", export="compact", progress=False)
    report = verify(path, tmp_path / "out", TEXT, max_tokens=128, seq_len=32, progress=False)
    assert report.passed and report.export == "compact" and report.experts_per_layer == {0: 3, 1: 5}


def test_refuses_another_original_or_no_data(tmp_path):
    path, out, adapter, model = compiled("qwen3_moe", tmp_path)
    other, _, _ = save_family("mixtral", tmp_path / "other")
    with pytest.raises(InputError, match="compiled from"):
        verify(other, out, TEXT, progress=False)
    with pytest.raises(InputError, match="pass --data"):
        verify(path, out, progress=False)


def test_cli_verify(tmp_path):
    from premoe.cli.verify import command

    path, out, adapter, model = compiled("qwen3_moe", tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(tiny.TEXT)
    args = [str(path), str(out), "--data", f"text={text}", "--max-tokens", "128", "--seq-len", "32"]
    result = CliRunner().invoke(command, [*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True
    result = CliRunner().invoke(command, [*args, "--tolerance", "-1", "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 1 and "FAIL" in result.output
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is False
    result = CliRunner().invoke(command, [*args, "--stream", "--workdir", str(tmp_path / "scratch"), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True


def perturbed(out, key: str, eps: float) -> None:
    """Add ``eps`` to every element of tensor ``key`` of the compiled checkpoint, in place on disk."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    tensors[key] = tensors[key] + eps
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def near_miss(tmp_path_factory):
    """A compiled qwen3_moe whose one kept expert is nudged so that max |Δlogit| is about 1e-3.

    The response of the logits to the nudge is measured once and the nudge
    rescaled to land at 1e-3 (it is linear at this size).
    """
    tmp_path = tmp_path_factory.mktemp("near")
    path, out, adapter, model = compiled("qwen3_moe", tmp_path)
    clean = verify(path, out, TEXT, max_tokens=256, seq_len=32, progress=False)
    assert clean.passed and clean.max_abs_diff <= 1e-5
    for expert in range(4):  # the first kept expert that the text routes to
        key = f"model.layers.1.mlp.experts.{expert}.down_proj.weight"
        perturbed(out, key, 1e-3)
        probe = verify(path, out, TEXT, max_tokens=256, seq_len=32, progress=False).max_abs_diff
        if probe > 1e-5:
            break
        perturbed(out, key, -1e-3)
    perturbed(out, key, 1e-3 * (1e-3 / probe - 1))  # now 1e-3 × (1e-3 / probe) in all
    return path, out


def test_a_near_miss_of_1e_3_fails_at_the_default_tolerance(near_miss):
    path, out = near_miss
    report = verify(path, out, TEXT, max_tokens=256, seq_len=32, progress=False)
    assert 5e-4 < report.max_abs_diff < 2e-3, report.max_abs_diff  # the near miss is what it claims
    assert report.tolerance == 1e-4 and not report.passed and "FAIL" in report.summary()
    assert verify(path, out, TEXT, max_tokens=256, seq_len=32, tolerance=1e-2, progress=False).passed


def test_the_cli_default_tolerance_catches_the_near_miss(near_miss, tmp_path):
    """A default loosened to 1e-1 (in verify() or the CLI) would let the near miss pass: this fails then."""
    from premoe.cli.verify import command

    path, out = near_miss
    text = tmp_path / "text.txt"
    text.write_text(tiny.TEXT)
    result = CliRunner().invoke(command, [str(path), str(out), "--data", f"text={text}", "--max-tokens", "256",
                                          "--seq-len", "32", "--json", "-"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is False and report["tolerance"] == 1e-4 and report["max_abs_diff"] > 5e-4


def test_shards_that_disagree_with_the_config_are_refused_before_loading(tmp_path):
    from premoe.errors import CheckpointError

    path, out, adapter, model = compiled("deepseek_v3", tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))  # no MTP layer on disk
    with pytest.raises(CheckpointError, match="declares 1 MTP layers, the shards hold 0"):
        verify(path, out, TEXT, max_tokens=128, seq_len=32, progress=False)


def test_verify_card_records_the_measured_quality_in_the_model_card(tmp_path):
    from huggingface_hub import ModelCard

    from premoe.cli.verify import command

    path, out, adapter, model = compiled("qwen3_moe", tmp_path)
    before = ModelCard.load(out / "README.md")
    assert "Not measured at compile time" in before.text
    text = tmp_path / "text.txt"
    text.write_text(tiny.TEXT)
    result = CliRunner().invoke(command, [str(path), str(out), "--data", f"text={text}", "--max-tokens", "128",
                                          "--seq-len", "32", "--json", str(tmp_path / "v.json"), "--card"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v.json").read_text())
    after = ModelCard.load(out / "README.md")
    assert after.data.to_dict() == before.data.to_dict()  # metadata untouched
    check = report["domains"][0]
    assert f"| text | {check['tokens']} | {check['max_abs_diff']:.2e} | {check['ppl_original']:.3f} | " \
           f"{check['ppl_compiled']:.3f} | {check['kl']:.4f} |" in after.text
    assert "PASS: the checkpoint is the source with its routing restricted" in after.text
    assert "Not measured at compile time" not in after.text
    assert after.text.count("## Quality") == 1 and "## Limitations" in after.text and "## Provenance" in after.text
    assert not list(out.glob(".README.md.tmp"))


def _routing(selected, scores=None, n_group=1):
    """A recorded routing of one layer (index 3), as premoe.verify._Routing leaves it."""
    from premoe.verify import _Routing

    routing = _Routing.__new__(_Routing)
    routing.n_group = n_group
    routing.selected = {3: torch.tensor(selected).sort(dim=-1).values}
    routing.scores = {} if scores is None else {3: torch.tensor(scores)}
    return routing


def _compare(compiled, forced, shape):
    """Flag near-tie flips of layer 3, then the positions compared: as verify does per batch."""
    from premoe.verify import _flag_tie_flips, _positions_to_compare

    flipped = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    flips = _flag_tie_flips(compiled, forced, 3, flipped)
    return _positions_to_compare(flipped, shape), flips


def test_a_near_tie_flip_leaves_out_its_token_and_what_follows_only():
    # one window of 3 tokens, top-2 of 4 experts; token 1 chose 2 (forced) vs 3 (compiled), scored 1e-7 apart
    scores = [[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.5, 0.5 - 1e-7], [0.9, 0.8, 0.1, 0.0]]
    forced = _routing([[0, 1], [0, 2], [0, 1]], scores)
    compare, flips = _compare(_routing([[0, 1], [0, 3], [0, 1]]), forced, (1, 3))
    assert flips == 1 and compare.tolist() == [[True, False, False]]
    # the same swap between clearly different scores is a wrong model, not rounding: it stays in the comparison
    scores[1][3] = 0.4
    compare, flips = _compare(_routing([[0, 1], [0, 3], [0, 1]]), _routing([[0, 1], [0, 2], [0, 1]],
                                                                                          scores), (1, 3))
    assert flips == 0 and compare.all()
    # identical routing: everything is compared
    compare, flips = _compare(_routing([[0, 1]] * 3), _routing([[0, 1]] * 3, scores), (1, 3))
    assert flips == 0 and compare.all()


def test_a_group_level_near_tie_flip_is_rounding_too():
    # 8 experts in 4 groups of 2, top-2 from the best group: groups 0 (0.5 + 0.3) and 3 (0.6 + 0.2 - 1e-7) tie
    scores = [[0.5, 0.3, 0.1, 0.1, 0.1, 0.1, 0.6, 0.2 - 1e-7]]
    compare, flips = _compare(_routing([[6, 7]]), _routing([[0, 1]], scores, n_group=4), (1, 1))
    assert flips == 1 and not compare.any()
    scores[0][7] = 0.1  # group 3 now clearly behind: the same swap is a wrong model
    compare, flips = _compare(_routing([[6, 7]]), _routing([[0, 1]], scores, n_group=4), (1, 1))
    assert flips == 0 and compare.all()
