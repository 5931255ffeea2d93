"""The shipped testbeds load like any HF checkpoint and their cards' perplexities are real; the DeepSeek-V3
training pieces (config, aux-loss-free bias balancing, export) do what DeepSeek does.

The ``testbed-dsv3`` checks skip while premoe/testbed/model_dsv3 is not shipped, so CI stays green before it is.
"""
import json
import subprocess
import sys

import pytest
import torch

from premoe import testbed
from premoe.modeling import shipped_dir

SHIPPED = [pytest.param(name, marks=pytest.mark.skipif(not (shipped_dir(name) / "config.json").exists(),
                                                         reason=f"{name} is not shipped in {shipped_dir(name)} yet"))
           for name in ("testbed", "testbed-dsv3")]
needs_dsv3 = SHIPPED[1].marks[0]


def test_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(testbed.path())
    tokenizer = AutoTokenizer.from_pretrained(testbed.path())
    config = model.config
    assert config.model_type == "qwen3_moe"
    assert config.num_hidden_layers >= 4 and config.num_experts >= 32 and config.num_experts_per_tok >= 4
    assert tokenizer.decode(tokenizer("def f(x): return x")["input_ids"]) == "def f(x): return x"


@pytest.mark.parametrize("name", SHIPPED)
def test_test_perplexity_matches_the_model_card(name):
    from premoe.evaluate import Evaluator
    from premoe.modeling import load_model, load_tokenizer
    from premoe.testbed.card import SEQ_LEN, split_sources

    card = json.loads((shipped_dir(name) / "card.json").read_text())
    domains = list(card["perplexity"])
    assert domains == testbed.domains()
    evaluator = Evaluator(load_model(name), load_tokenizer(name), split_sources(testbed.corpus_path(), domains, "test"),
                          seq_len=SEQ_LEN, max_windows=card["windows"])
    result = evaluator.evaluate(kl=False)
    for domain in domains:
        measured, recorded = result.domains[domain].ppl, card["perplexity"][domain]["test"]
        assert abs(measured / recorded - 1) < 0.01, f"{domain}: measured {measured:.3f}, card says {recorded:.3f}"


@pytest.mark.parametrize("name", SHIPPED)
def test_card_reports_specialisation(name):
    card = json.loads((shipped_dir(name) / "card.json").read_text())
    for domain, per_layer in card["coverage90"].items():
        assert len(per_layer) == len(card["moe_layers"])
        assert all(1 <= c <= card["num_experts"] for c in per_layer)


# --------------------------------------------------------------------------- testbed-dsv3 (shipped)


@needs_dsv3
def test_dsv3_is_deepseek_v3_with_its_router():
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shipped_dir("testbed-dsv3")
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert config.n_routed_experts >= 64 and config.num_experts_per_tok >= 6 and config.num_hidden_layers >= 6
    assert config.n_group == 8 and config.topk_group == 4 and config.n_shared_experts == 1
    assert config.first_k_dense_replace == 1 and config.tie_word_embeddings
    moe_layers = range(config.first_k_dense_replace, config.num_hidden_layers)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    for layer in moe_layers:
        gate = model.model.layers[layer].mlp.gate
        # the bias was trained (moved off its zero init) and is stored in fp32, like DeepSeek-V3's checkpoints
        assert dtypes[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] == "F32"
        assert float(gate.e_score_correction_bias.abs().max()) > 0
        # sigmoid scoring: the weights of the chosen experts are sigmoid(logits), renormalised and scaled
        hidden = torch.randn(5, config.hidden_size)
        logits, weights, chosen = gate(hidden)
        expected = torch.sigmoid(logits).gather(1, chosen)
        expected = expected / expected.sum(-1, keepdim=True) * config.routed_scaling_factor
        torch.testing.assert_close(weights, expected)
    assert dtypes["model.layers.1.mlp.experts.0.gate_proj.weight"] == "BF16"
    first = AutoTokenizer.from_pretrained(testbed.path())
    assert AutoTokenizer.from_pretrained(path).get_vocab() == first.get_vocab()  # same token ids as the first testbed


# --------------------------------------------------------------------------- training pieces (no shipped model needed)


def test_dsv3_training_config_is_the_deepseek_v3_router():
    from premoe.testbed.train import config_for, model_config

    cfg = config_for("deepseek_v3")
    assert cfg.tokenizer == "testbed" and cfg.threads >= 1
    config = model_config(cfg, _Tokenizer())
    assert config.model_type == "deepseek_v3"
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_group, config.topk_group) == (64, 6, 8, 4)
    assert (config.num_hidden_layers, config.first_k_dense_replace, config.n_shared_experts) == (6, 1, 1)
    assert config.tie_word_embeddings and config.num_nextn_predict_layers == 0 and config.vocab_size == 8192


class _Tokenizer:
    eos_token_id = 0


def _tiny_dsv3():
    from premoe.testbed.train import build_model, config_for

    torch.manual_seed(0)
    cfg = config_for("deepseek_v3", vocab_size=320, hidden_size=32, num_layers=3, num_heads=2, num_experts=8, top_k=2,
                     num_groups=2, topk_groups=1, moe_intermediate_size=16, dense_intermediate_size=32,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, bias_update_speed=0.01)
    return cfg, build_model(cfg, _Tokenizer())


def test_bias_balancer_moves_each_bias_against_its_load():
    from premoe.testbed.train import BiasBalancer

    cfg, model = _tiny_dsv3()
    balancer = BiasBalancer(model, cfg.bias_update_speed)
    assert len(balancer.gates) == 2  # layers 1 and 2; layer 0 is dense
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())  # a buffer: no gradients
    balancer.gates[0].e_score_correction_bias[3] = 10.0  # expert 3 (and its group) wins every token in layer 1
    batch = torch.randint(0, 320, (2, 16))
    model.eval()
    model(input_ids=batch)
    assert balancer.imbalance() == [0.0, 0.0]  # eval forwards are not counted
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    assert balancer.gates[0].e_score_correction_bias.grad is None
    load = balancer.loads[0].clone()
    assert load[3] == 32 and load.sum() == 32 * cfg.top_k  # every one of the 32 tokens chose expert 3
    assert load[4:].sum() == 0  # the other group was never chosen
    loads = [load.clone() for load in balancer.loads]
    before = [g.e_score_correction_bias.clone() for g in balancer.gates]
    balancer.step()
    moved = balancer.gates[0].e_score_correction_bias - before[0]
    assert torch.allclose(moved[3], torch.tensor(-0.01), atol=1e-6)  # overloaded: less likely next time
    assert torch.allclose(moved[4:], torch.full((4,), 0.01), atol=1e-6)  # never chosen: more likely next time
    expected = before[1] + 0.01 * torch.sign(loads[1].mean() - loads[1])
    assert torch.equal(balancer.gates[1].e_score_correction_bias, expected)
    assert float(balancer.loads[0].sum()) == 0  # counts restart after each step


def test_export_keeps_routers_fp32_and_routes_the_same(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from premoe.testbed.train import export, sigmoid_routers
    from tiny import tiny_tokenizer

    cfg, model = _tiny_dsv3()
    for gate in sigmoid_routers(model):
        gate.e_score_correction_bias.copy_(torch.randn(8) * 1e-3)  # steps smaller than bf16 can hold near 0.5
    history = {"arch": cfg.arch, "train": [(1, 5.0)], "val": [], "imbalance": [], "tokens_per_step": 32, "seconds": 1.0}
    out = export(model, tiny_tokenizer(), cfg, history, tmp_path / "dsv3")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {dtypes[f"model.layers.{i}.mlp.gate.{n}"] for i in (1, 2) for n in ("weight", "e_score_correction_bias")} == {"F32"}
    assert dtypes["model.layers.1.mlp.experts.0.down_proj.weight"] == "BF16" and dtypes["model.embed_tokens.weight"] == "BF16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hidden = torch.randn(64, 32)
    for mine, theirs in zip(sigmoid_routers(model), sigmoid_routers(reloaded)):
        assert torch.equal(mine.e_score_correction_bias, theirs.e_score_correction_bias)
        assert torch.equal(mine(hidden)[2].sort(-1).values, theirs(hidden)[2].sort(-1).values)
    assert json.loads((out / "training.json").read_text())["config"]["arch"] == "deepseek_v3"


def test_unshipped_testbed_is_a_one_line_error(tmp_path, monkeypatch):
    from premoe.errors import MissingFileError
    from premoe.modeling import resolve_model_path

    monkeypatch.setattr(testbed, "path", lambda: tmp_path / "model")
    with pytest.raises(MissingFileError, match="testbed-dsv3 model is not shipped.*--ship testbed-dsv3"):
        resolve_model_path("testbed-dsv3")


@pytest.mark.skipif((shipped_dir("testbed-dsv3") / "config.json").exists(), reason="testbed-dsv3 is shipped")
def test_cli_says_testbed_dsv3_is_not_shipped_yet():
    result = subprocess.run([sys.executable, "-c", "from premoe.cli import main; main()", "eval", "testbed-dsv3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "testbed-dsv3 model is not shipped" in result.stderr and "Traceback" not in result.stderr


def test_artefacts_of_a_shipped_testbed_find_it_after_the_repository_moves(tmp_path):
    """A store or profile records the testbed's absolute path; a fresh clone elsewhere must still find it by name,
    and only when the config hash says it is the same model."""
    from premoe.errors import MissingFileError
    from premoe.modeling import locate_model, model_identity

    identity = model_identity("testbed")
    assert locate_model(identity) == identity["path"]
    moved = {**identity, "path": str(tmp_path / "old-clone" / "premoe" / "testbed" / "model")}
    assert locate_model(moved) == "testbed"
    with pytest.raises(MissingFileError, match="not there any more; pass --model"):
        locate_model({**moved, "config_hash": "0" * 16})
    with pytest.raises(MissingFileError, match="not there any more"):
        locate_model({**moved, "name": str(tmp_path / "elsewhere")})
