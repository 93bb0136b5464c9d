"""Tool calls and reasoning: the parser (whole and streamed), chat completions with ``tools`` on a Qwen3-Omni
tiny checkpoint (its chat template describes tools), tool turns continuing the conversation, the realtime
session's tools and function_call items through the official SDK, and refusals where a template has none."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.register_assert_rewrite("tests.serve_helpers")

from tests.serve_helpers import TEST_LIMITS  # noqa: E402
from thinktalk.serve.toolcalls import AnswerStream, parse_answer  # noqa: E402

pytest_plugins = ["tests.serve_helpers"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip

ANSWERS = [
    "Plain answer.",
    "<think>\nThe user wants weather.\n</think>\n\nIt is sunny.",
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '<think>hm</think>\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
    '{"name": "b", "arguments": "{\\"x\\": 1}"}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',  # bad JSON
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": {}}',  # never closed
    "a < b and <tool but not a tag",
]


def test_parse_answer():
    p = parse_answer(ANSWERS[1])
    assert p.reasoning == "The user wants weather." and p.content == "It is sunny." and not p.tool_calls
    p = parse_answer(ANSWERS[2])
    assert p.content == "Let me check." and [c.name for c in p.tool_calls] == ["get_weather"]
    assert json.loads(p.tool_calls[0].arguments) == {"city": "Paris"} and p.tool_calls[0].id.startswith("call_")
    p = parse_answer(ANSWERS[3])
    assert p.reasoning == "hm" and [(c.name, json.loads(c.arguments)) for c in p.tool_calls] == [
        ("a", {}),
        ("b", {"x": 1}),
    ]
    for bad, why in zip(ANSWERS[4:8], ("not valid JSON", "no valid 'name'", "not a JSON object", "not closed")):
        p = parse_answer(bad)
        assert not p.tool_calls and len(p.errors) == 1 and why in p.errors[0], (bad, p.errors)
    assert parse_answer(ANSWERS[2], tools=False).content == ANSWERS[2]  # no tools offered: text stays text
    assert parse_answer(ANSWERS[8]).content == ANSWERS[8]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_answer_stream_equals_whole_parse(step):
    """Deltas split anywhere (inside tags too) give the same channels as the whole answer."""
    for text in ANSWERS:
        stream = AnswerStream()
        out = []
        for i in range(0, len(text), step):
            out += stream.feed(text[i : i + step])
        out += stream.feed("", final=True)
        whole = parse_answer(text)
        content = "".join(t for c, t in out if c == "content")
        reasoning = "".join(t for c, t in out if c == "reasoning")
        assert reasoning.strip("\n") == (whole.reasoning or ""), (text, out)
        if not whole.errors:
            assert content.strip() == whole.content.strip(), (text, out)
        assert "<tool_call>" not in content and "<think>" not in content


def test_completion_response_shapes():
    """The server's response builder on answers as the model streams them: tool_calls, reasoning, errors."""
    from types import SimpleNamespace

    from thinktalk.serve.backend import Event, Usage
    from thinktalk.serve.openai_api import completion_response

    ctx = SimpleNamespace(info=SimpleNamespace(name="m"))

    def run(text):
        events = [Event("text", text=text[i : i + 3]) for i in range(0, len(text), 3)]
        events.append(Event("done", finish_reason="stop", usage=Usage(1, 2)))
        return json.loads(asyncio.run(completion_response(ctx, events, "id", None, tools=True)).body)["choices"][0]

    c = run(ANSWERS[2])
    assert c["finish_reason"] == "tool_calls" and c["message"]["content"] == "Let me check."
    assert c["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    c = run(ANSWERS[1])
    assert c["finish_reason"] == "stop" and c["message"]["reasoning_content"] == "The user wants weather."
    assert c["message"]["content"] == "It is sunny."
    c = run(ANSWERS[4])
    assert c["finish_reason"] == "stop" and "tool_calls" not in c["message"]
    assert "not valid JSON" in c["message"]["tool_call_errors"][0] and "<tool_call>" in c["message"]["content"]


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory):
    """A server on a tiny Qwen3-Omni checkpoint (Thinker only), whose chat template has tools."""
    import torch

    from thinktalk.serve.app import create_app
    from thinktalk.serve.server import ServerThread, load_for_serving
    from thinktalk.serve.settings import ServeSettings
    from thinktalk.testing.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(str(tmp_path_factory.mktemp("q3_tools")), "qwen3_omni_moe", with_speech=False)
    torch.manual_seed(0)
    model, processor = load_for_serving(path)
    app = create_app(model, processor, ServeSettings(**TEST_LIMITS), model_name="tiny3")
    with ServerThread(app) as srv:
        yield srv


def chat(url: str, **body):
    import httpx

    return httpx.post(url + "/v1/chat/completions", json={"max_tokens": 2, **body}, timeout=60)


def test_chat_tools_reach_the_prompt_and_tool_turns_continue(qwen3_server):
    user = [{"role": "user", "content": "Weather in Paris?"}]
    plain = chat(qwen3_server.url, messages=user)
    assert plain.status_code == 200, plain.text
    with_tools = chat(qwen3_server.url, messages=user, tools=[WEATHER])
    assert with_tools.status_code == 200, with_tools.text
    n0, n1 = plain.json()["usage"]["prompt_tokens"], with_tools.json()["usage"]["prompt_tokens"]
    assert n1 > n0 + 20  # the tool's description is in the system turn
    none = chat(qwen3_server.url, messages=user, tools=[WEATHER], tool_choice="none")
    assert none.json()["usage"]["prompt_tokens"] == n0
    turn = user + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]  # fmt: skip
    after = chat(qwen3_server.url, messages=turn, tools=[WEATHER])
    assert after.status_code == 200, after.text
    assert after.json()["usage"]["prompt_tokens"] > n1 + 10
    bad = chat(qwen3_server.url, messages=turn[:1] + [{**turn[1], "tool_calls": [{**turn[1]["tool_calls"][0],
               "function": {"name": "get_weather", "arguments": "{nope"}}]}] + turn[2:], tools=[WEATHER])  # fmt: skip
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    forced = chat(qwen3_server.url, messages=user, tools=[WEATHER], tool_choice="required")
    assert forced.status_code == 400


def test_chat_tools_refused_without_template_support(server):
    r = chat(server.url, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert r.status_code == 400 and r.json()["error"]["code"] == "tools_not_supported"


def test_realtime_tools_and_function_call_items(qwen3_server):
    """The SDK's realtime client: session tools, a function_call and its function_call_output continue the turn."""
    openai = pytest.importorskip("openai")
    url = qwen3_server.url
    client = openai.OpenAI(api_key="x", base_url=url + "/v1", websocket_base_url=url.replace("http", "ws") + "/v1")
    tool = {"type": "function", **WEATHER["function"]}
    with client.realtime.connect(model="tiny3") as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [tool],
                                     "tool_choice": "auto", "max_output_tokens": 2})  # fmt: skip
        ev = conn.recv()
        assert ev.type == "session.updated" and ev.session.tools[0].name == "get_weather"
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Weather in Paris?"}]})  # fmt: skip
        while conn.recv().type != "conversation.item.done":
            pass
        conn.response.create()
        events = []
        while not events or events[-1].type != "response.done":
            events.append(conn.recv())
        first = events[-1].response.usage.input_tokens
        conn.conversation.item.create(item={"type": "function_call", "call_id": "call_1", "name": "get_weather",
                                            "arguments": '{"city": "Paris"}'})  # fmt: skip
        added = conn.recv()
        assert added.type == "conversation.item.added" and added.item.type == "function_call"
        conn.recv()
        conn.conversation.item.create(item={"type": "function_call_output", "call_id": "call_1", "output": "sunny"})
        added = conn.recv()
        assert added.type == "conversation.item.added" and added.item.type == "function_call_output"
        conn.recv()
        conn.response.create()
        events = []
        while not events or events[-1].type != "response.done":
            events.append(conn.recv())
        assert events[-1].response.status in ("completed", "incomplete")
        assert events[-1].response.usage.input_tokens > first + 10  # the call and its output are in the prompt
