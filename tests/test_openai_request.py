"""parse_request on its own (no server): every body is a request or a 400 that names the problem in the client's
terms, whatever the body holds."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from premoe.guard import ApiError
from premoe.openai_request import OpenAIRequest, parse_request


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


# --------------------------------------------------------------------------- exact results (mutation survivors)


def test_every_field_parses_to_its_exact_value():
    raw = json.dumps({"prompt": "hi", "model": "m", "max_tokens": 1, "min_tokens": 0, "temperature": 0.5,
                      "top_p": 0.25, "stop": "\n", "seed": -(1 << 63), "stream": True,
                      "stream_options": {"include_usage": True}, "user": "", "n": 1, "logprobs": None}).encode()
    assert parse_request(raw, chat=False) == OpenAIRequest(
        chat=False, prompt="hi", model="m", max_tokens=1, min_tokens=0, temperature=0.5, top_p=0.25, stop=["\n"],
        seed=-(1 << 63), stream=True)


def test_absent_fields_take_premoes_defaults():
    request = parse_request(b'{"prompt": "x"}', chat=False)
    assert request == OpenAIRequest(chat=False, prompt="x")
    assert (request.max_tokens, request.min_tokens, request.temperature, request.top_p, request.stop, request.stream,
            request.greedy) == (None, 0, 0.0, 1.0, [], False, True)


def test_a_chat_parses_to_its_messages_and_no_prompt():
    body = {"messages": [{"role": "system", "content": "be brief", "name": "rules"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 7, "stop": ["x", "y", "z", "w"], "seed": (1 << 63) - 1,
            "response_format": {"type": "text"}}
    assert parse_request(json.dumps(body).encode(), chat=True) == OpenAIRequest(
        chat=True, prompt="", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}],
        max_tokens=7, stop=["x", "y", "z", "w"], seed=(1 << 63) - 1)


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_a_chat_takes_either_token_limit(key):
    raw = json.dumps({"messages": [{"role": "user", "content": "x"}], key: 3}).encode()
    assert parse_request(raw, chat=True).max_tokens == 3


@pytest.mark.parametrize("prompt, expected", [(["one"], "one"), ("two", "two")])
def test_a_prompt_list_of_one_string_is_that_string(prompt, expected):
    assert parse_request(json.dumps({"prompt": prompt}).encode(), chat=False).prompt == expected


@pytest.mark.parametrize("body, chat, ok", [
    ({"prompt": "x", "n": 1, "best_of": 1, "echo": False, "logprobs": False, "presence_penalty": 0,
      "frequency_penalty": 0.0, "logit_bias": {}, "suffix": "", "parallel_tool_calls": True}, False, True),
    ({"prompt": "x", "parallel_tool_calls": False}, False, True),
    ({"prompt": "x", "n": True}, False, False),  # true is not 1
    ({"prompt": "x", "echo": 0}, False, False),  # 0 is not false
    ({"prompt": "x", "max_completion_tokens": 3}, False, False),  # a chat field
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, True, False),  # a completions field
])
def test_unimplemented_parameters_pass_only_at_their_no_op_value(body, chat, ok):
    if ok:
        parse_request(json.dumps(body).encode(), chat)
    else:
        assert refusal(json.dumps(body).encode(), chat).code == "unsupported_parameter"


def test_json_nested_16_deep_is_accepted_and_17_deep_refused():
    from premoe.openai_request import MAX_DEPTH, parse_json

    assert MAX_DEPTH == 16 and parse_json(b"[" * 16 + b"]" * 16) == [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]
    assert parse_json(b'"x"') == "x" and parse_json(b"{}") == {}
    for raw in (b"[" * 17 + b"]" * 17, b"[" * 100_000 + b"]" * 100_000):  # the second: past Python's recursion
        error = refusal(raw, chat=False)
        assert (error.message, error.code) == ("the request body is nested deeper than 16 levels", "invalid_json")


NUMBER_60 = "1" * 70
TOO_MANY = {f"extra_parameter_{i}_" + "x" * 40: 1 for i in range(9)}  # 9 names, each over 50 characters
USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("raw, chat, message, param, code", [
    (b"[]", False, "the request body must be a JSON object, not an empty list", None, None),
    (b'"x"', True, "the request body must be a JSON object, not a string", None, None),
    (b'{"prompt": NaN}', False, "the request body is not valid JSON: NaN is not valid JSON", None, "invalid_json"),
    (b'{"prompt": "\xff"}', False, "the request body is not valid JSON: 'utf-8' codec can't decode byte 0xff in "
     "position 12: invalid start byte", None, "invalid_json"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, False,
     "'stop' must be a non-empty string or a list of at most 4 of them", "stop", None),
    ({"prompt": "x", "stop": [""]}, False, "'stop' must be a non-empty string or a list of at most 4 of them", "stop",
     None),
    ({"prompt": "x", "stop": 5}, False, "'stop' must be a non-empty string or a list of at most 4 of them", "stop",
     None),
    ({"max_tokens": 1, "max_completion_tokens": 1}, True, "give 'max_completion_tokens' or 'max_tokens', not both",
     "max_tokens", None),
    ({"prompt": ["a", "b"]}, False,
     "'prompt' must be one string: batches of prompts and token-id prompts are not supported", "prompt", None),
    ({"prompt": [1]}, False,
     "'prompt' must be one string: batches of prompts and token-id prompts are not supported", "prompt", None),
    ({"prompt": ""}, False, "'prompt' must be a non-empty string, not an empty string", "prompt", None),
    ({}, False, "'prompt' must be a non-empty string, not null", "prompt", None),
    ({"messages": []}, True, "'messages' must be a non-empty list of {role, content} objects, not an empty list",
     "messages", None),
    ({"messages": {"role": "user"}}, True,
     "'messages' must be a non-empty list of {role, content} objects, not an object", "messages", None),
    ({"messages": [None]}, True, "messages[0] must be an object with a 'role' and a 'content', not null",
     "messages[0]", None),
    ({"messages": USER + ["hi"]}, True, "messages[1] must be an object with a 'role' and a 'content', not a string",
     "messages[1]", None),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [], "audio": {}}]}, True,
     "messages[0] has unsupported fields 'tool_calls', 'audio' (tool calls, audio, ... are not supported)",
     "messages[0]", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x", **TOO_MANY}]}, True,
     "messages[0] has unsupported fields " + ", ".join(repr(n[:50]) for n in list(TOO_MANY)[:8])
     + " (tool calls, audio, ... are not supported)", "messages[0]", "unsupported_parameter"),
    ({"messages": [{"role": "u" * 60, "content": "x"}]}, True,
     f"messages[0].role must be one of system, developer, user, assistant, not {'u' * 50!r}", "messages[0].role",
     None),
    ({"messages": [{"role": "user", "content": [{"type": "t" * 60}]}]}, True,
     f"messages[0].content[0] must be {{\"type\": \"text\", \"text\": string}}; {'t' * 50!r} parts are not "
     "supported", "messages[0].content", None),
    ({"messages": [{"role": "user", "content": [{"type": 5}]}]}, True,
     "messages[0].content[0] must be {\"type\": \"text\", \"text\": string}; '5' parts are not supported",
     "messages[0].content", None),
    ({"messages": [{"role": "user", "content": [{"text": "a"}]}]}, True,
     "messages[0].content[0] must be {\"type\": \"text\", \"text\": string}", "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "x", "name": ""}]}, True,
     "'messages[0].name' must be a non-empty string, not an empty string", "messages[0].name", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, True,
     "messages[0].content[0] must be {\"type\": \"text\", \"text\": string}; 'image_url' parts are not supported",
     "messages[0].content", None),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]}, True,
     "messages[0].content[1] must be {\"type\": \"text\", \"text\": string}", "messages[0].content", None),
    ({"messages": [{"role": "user", "content": ["a"]}]}, True,
     "messages[0].content[0] must be {\"type\": \"text\", \"text\": string}", "messages[0].content", None),
    ({"messages": [{"role": "user", "content": 5}]}, True,
     "messages[0].content must be a string or a list of text parts, not a number", "messages[0].content", None),
    ({"messages": USER, "response_format": {"type": "json_object"}}, True,
     "'response_format' other than {\"type\": \"text\"} is not supported", "response_format", "unsupported_parameter"),
    ({"prompt": "x", "n": 2}, False,
     "unsupported parameter 'n': this server does not implement it; remove or set to null", "n",
     "unsupported_parameter"),
    ({"prompt": "x", "n": 2, "echo": True}, False,
     "unsupported parameters 'n', 'echo': this server does not implement them; remove or set to null", "n",
     "unsupported_parameter"),
    ({"prompt": "x", **TOO_MANY}, False,
     "unsupported parameters " + ", ".join(repr(n[:50]) for n in list(TOO_MANY)[:8])
     + ": this server does not implement them; remove or set to null", list(TOO_MANY)[0][:50],
     "unsupported_parameter"),
    ({"prompt": "x", "model": ""}, False, "'model' must be a non-empty string, not an empty string", "model", None),
    ({"prompt": "x", "user": 5}, False, "'user' must be a string, not a number", "user", None),
    ({"prompt": "x", "max_tokens": 0}, False, "'max_tokens' must be an integer >= 1, not 0", "max_tokens", None),
    ({"prompt": "x", "max_tokens": 2.5}, False, "'max_tokens' must be an integer >= 1, not 2.5", "max_tokens", None),
    ({"prompt": "x", "max_tokens": True}, False, "'max_tokens' must be an integer >= 1, not True", "max_tokens",
     None),
    ({"messages": USER, "max_completion_tokens": 0}, True,
     "'max_completion_tokens' must be an integer >= 1, not 0", "max_completion_tokens", None),
    ({"prompt": "x", "min_tokens": -1}, False, "'min_tokens' must be an integer >= 0, not -1", "min_tokens", None),
    ({"prompt": "x", "seed": 1 << 63}, False, "'seed' must be an integer >= -9223372036854775808 and <= "
     "9223372036854775807, not 9223372036854775808", "seed", None),
    ({"prompt": "x", "seed": int(NUMBER_60)}, False, "'seed' must be an integer >= -9223372036854775808 and <= "
     f"9223372036854775807, not {NUMBER_60[:60]}", "seed", None),
    ({"prompt": "x", "temperature": 2.5}, False, "'temperature' must be a number in [0, 2], not 2.5", "temperature",
     None),
    ({"prompt": "x", "temperature": -0.5}, False, "'temperature' must be a number in [0, 2], not -0.5",
     "temperature", None),
    ({"prompt": "x", "top_p": True}, False, "'top_p' must be a number in [0, 1], not True", "top_p", None),
    ({"prompt": "x", "top_p": "1"}, False, "'top_p' must be a number in [0, 1], not a string", "top_p", None),
    ({"prompt": "x", "stream": "yes"}, False, "'stream' must be true or false, not a string", "stream", None),
    ({"prompt": "x", "stream": 1}, False, "'stream' must be true or false, not 1", "stream", None),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, False,
     "'stream_options' is only allowed with 'stream': true", "stream_options", None),
    ({"prompt": "x", "stream": False, "stream_options": {}}, False,
     "'stream_options' is only allowed with 'stream': true", "stream_options", None),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "x": 1}}, False,
     "'stream_options' may only hold 'include_usage' (a boolean); usage is always sent", "stream_options", None),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, False,
     "'stream_options' may only hold 'include_usage' (a boolean); usage is always sent", "stream_options", None),
    ({"prompt": "x", "stream": True, "stream_options": ["include_usage"]}, False,
     "'stream_options' may only hold 'include_usage' (a boolean); usage is always sent", "stream_options", None),
])
def test_each_refusal_names_the_field_in_exact_words(raw, chat, message, param, code):
    error = refusal(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), chat)
    assert (error.message, error.param, error.code, error.kind) == (message, param, code, "invalid_request_error")


@pytest.mark.parametrize("body, chat, name", [
    ({"prompt": "a\ud800"}, False, "prompt"),
    ({"prompt": "x", "stop": ["\ud800"]}, False, "stop"),
    ({"prompt": "x", "model": "\ud800"}, False, "model"),
    ({"prompt": "x", "user": "\ud800"}, False, "user"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, True, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "name": "\ud800"}]}, True, "messages[0].name"),
])
def test_a_lone_surrogate_is_refused_where_it_is(body, chat, name):
    error = refusal(json.dumps(body).encode(), chat)  # json.dumps writes the surrogate as the escape \ud800
    position = 1 if body.get("prompt") == "a\ud800" else 0
    assert (error.message, error.param) == (f"'{name}' is not valid Unicode (a lone surrogate at character "
                                            f"{position})", name)


@pytest.mark.parametrize("value, kind", [("", "an empty string"), ([], "an empty list"), ({}, "an empty object"),
                                         ([1], "a list"), ({"a": 1}, "an object"),
                                         (5, "a number"), (1.5, "a number"), (True, "a boolean"),
                                         (False, "a boolean"), (0, "a number")])
def test_an_error_says_what_kind_of_value_it_got(value, kind):
    """The kind words of every message ("not an empty list"): what the client sent, in JSON's terms."""
    error = refusal(json.dumps({"messages": [{"role": "user", "content": "x", "name": value}]}).encode(), chat=True)
    assert error.message == f"'messages[0].name' must be a non-empty string, not {kind}"


def test_a_string_where_a_list_belongs_is_called_a_string():
    error = refusal(b'{"messages": "hi"}', chat=True)
    assert error.message == "'messages' must be a non-empty list of {role, content} objects, not a string"


def test_a_request_for_another_model_is_a_404_naming_what_is_served():
    from premoe.openai_request import check_model, model_list

    for model in (None, "testbed"):  # no model named, or the served one: accepted
        check_model(parse_request(json.dumps({"prompt": "x", **({"model": model} if model else {})}).encode(), False),
                    "testbed", "server")
    with pytest.raises(ApiError) as refused:
        check_model(parse_request(b'{"prompt": "x", "model": "' + b"g" * 150 + b'"}', False), "testbed", "router")
    assert (refused.value.status, refused.value.code, refused.value.param) == (404, "model_not_found", "model")
    assert str(refused.value) == f"the model {'g' * 100!r} does not exist; this router serves 'testbed'"
    assert model_list("testbed", 7) == {"object": "list", "data": [{"id": "testbed", "object": "model", "created": 7,
                                                                    "owned_by": "premoe"}]}
