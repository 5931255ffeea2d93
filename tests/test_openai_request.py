"""parse_request on its own (no server): every body is a request or a 400 that names the problem in the client's
terms, whatever the body holds."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from premoe.guard import ApiError
from premoe.openai_request import parse_request


def refusal(raw: bytes, chat: bool) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(raw, chat)
    assert caught.value.status == 400
    return caught.value


def test_a_number_with_too_many_digits_says_so_without_pythons_advice():
    error = refusal(b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", chat=False)
    assert "5000 digits" in error.message and "sys." not in error.message


@pytest.mark.parametrize("message, said", [({"content": "x"}, "not missing"), ({"role": 5, "content": "x"}, "a number"),
                                           ({"role": ["user"], "content": "x"}, "a list"),
                                           ({"role": "tool", "content": "x"}, "not 'tool'")])
def test_a_bad_role_says_what_it_got(message, said):
    error = refusal(json.dumps({"messages": [message]}).encode(), chat=True)
    assert error.param == "messages[0].role" and said in error.message and "None" not in error.message


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)
KEYS = st.sampled_from(["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                        "seed", "n", "stream", "stream_options", "model", "user", "min_tokens", "logprobs",
                        "response_format", "role", "content"])


@settings(max_examples=400, deadline=None)
@given(body=st.dictionaries(KEYS, JSON, max_size=6) | JSON, chat=st.booleans())
def test_any_json_body_is_a_request_or_a_400(body, chat):
    try:
        request = parse_request(json.dumps(body).encode(), chat)
    except ApiError as e:
        assert e.status == 400 and e.message and "None" not in e.message.replace("'None'", "")
        return
    assert (request.messages if chat else request.prompt)
    assert request.max_tokens is None or request.max_tokens >= 1
    assert 0 <= request.temperature <= 2 and 0 <= request.top_p <= 1 and len(request.stop) <= 4
