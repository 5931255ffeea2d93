"""The shipped testbed: loads like any HF checkpoint and its card's perplexities are real."""
import json


from premoe import testbed


def test_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(testbed.path())
    tokenizer = AutoTokenizer.from_pretrained(testbed.path())
    config = model.config
    assert config.model_type == "qwen3_moe"
    assert config.num_hidden_layers >= 4 and config.num_experts >= 32 and config.num_experts_per_tok >= 4
    assert tokenizer.decode(tokenizer("def f(x): return x")["input_ids"]) == "def f(x): return x"


def test_test_perplexity_matches_the_model_card():
    from premoe.testbed.card import SEQ_LEN, split_sources
    from premoe.evaluate import Evaluator
    from premoe.modeling import load_model, load_tokenizer

    card = json.loads((testbed.path() / "card.json").read_text())
    domains = list(card["perplexity"])
    assert domains == testbed.domains()
    evaluator = Evaluator(load_model("testbed"), load_tokenizer("testbed"),
                          split_sources(testbed.corpus_path(), domains, "test"), seq_len=SEQ_LEN,
                          max_windows=card["windows"])
    result = evaluator.evaluate(kl=False)
    for domain in domains:
        measured, recorded = result.domains[domain].ppl, card["perplexity"][domain]["test"]
        assert abs(measured / recorded - 1) < 0.01, f"{domain}: measured {measured:.3f}, card says {recorded:.3f}"


def test_card_reports_specialisation():
    card = json.loads((testbed.path() / "card.json").read_text())
    for domain, per_layer in card["coverage90"].items():
        assert len(per_layer) == len(card["moe_layers"])
        assert all(1 <= c <= card["num_experts"] for c in per_layer)
