"""premoe.modelcard renders the compiled checkpoint's card exactly as huggingface_hub's ModelCard would.

compile renders it itself (huggingface_hub's import alone is a fifth of compiling DeepSeek-V3's layout at toy
width); these tests pin its output to huggingface_hub's, for ordinary cards and for random metadata and text.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from premoe.modelcard import TEMPLATE, _render_with_hub, _source_license, render_card

FIELDS = sorted(set(__import__("re").findall(r"\{\{ (\w+) \}\}", TEMPLATE)) - {"card_data"})


def values(**given) -> dict:
    return {name: given.get(name, f"<{name}>") for name in FIELDS}


def test_ordinary_cards_match_huggingface_hub():
    for metadata in [
        {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["premoe", "moe", "pruned"]},
        {"base_model": "deepseek-ai/DeepSeek-V3", "library_name": "transformers", "license": "mit",
         "pipeline_tag": "text-generation", "tags": ["premoe", "moe", "pruned", "deepseek_v3"]},
        {"library_name": "transformers", "license": "other", "license_name": "deepseek",
         "license_link": "LICENSE", "pipeline_tag": "text-generation", "tags": ["premoe"]},
    ]:
        filled = values(kept_rows="| 3 | 0-127 |\n| 4 | 0-63, 128-191 |", scorer=None, num_experts=256,
                        limitations="- one\n- two\n")
        assert render_card(metadata, filled) == _render_with_hub(metadata, filled)


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_SCALAR = st.one_of(st.from_regex(r"[A-Za-z][A-Za-z0-9_./-]{0,10}", fullmatch=True), _TEXT,
                    st.sampled_from(["yes", "No", "NULL", "on", "1.5", "a: b", "-x", "#c", "mit\n"]))


@settings(max_examples=150, deadline=None)
@given(base=st.one_of(st.none(), _SCALAR), license=st.one_of(st.none(), _SCALAR),
       tags=st.lists(_SCALAR, min_size=1, max_size=4, unique=True), texts=st.lists(_TEXT, min_size=3, max_size=3))
def test_any_card_matches_huggingface_hub(base, license, tags, texts):
    """Plain values take the fast path, anything else (quoting, carriage returns, YAML words) huggingface_hub's."""
    metadata = {k: v for k, v in (("base_model", base), ("library_name", "transformers"), ("license", license),
                                  ("pipeline_tag", "text-generation"), ("tags", tags)) if v is not None}
    filled = values(title=texts[0], target=texts[1], limitations=texts[2])
    assert render_card(metadata, filled) == _render_with_hub(metadata, filled)


def test_the_source_license_is_read_as_huggingface_hub_reads_it(tmp_path):
    from huggingface_hub import ModelCard

    cases = ["---\nlicense: apache-2.0\ntags: [base]\n---\n# Model\n",
             "---\r\nlicense: other\r\nlicense_name: deepseek\r\nlicense_link: LICENSE\r\n---\r\ntext\r\n",
             "---\nlicense: [a, b]\n---\n", "---\n- a list\n---\n", "---\nlicense: 'mit'\nbroken: [\n---\n",
             "no metadata\n", "---\nlicense: mit\n"]
    for i, text in enumerate(cases):
        path = tmp_path / str(i)
        path.mkdir()
        (path / "README.md").write_bytes(text.encode())
        try:
            data = ModelCard.load(path / "README.md", ignore_metadata_errors=True).data.to_dict()
        except Exception:  # noqa: BLE001 - what compile did before: no license when huggingface_hub refuses the card
            data = {}
        expected = {k: data[k] for k in ("license", "license_name", "license_link") if isinstance(data.get(k), str)}
        assert _source_license(path) == expected, text
