"""Tool calling through the official openai client, with SmolLM2's weights under a Hermes-style chat template
(the format tools.py reads): tools and past calls render as transformers renders them, a required call always
parses and keeps to its function's parameters (checked by the jsonschema package), streamed or whole."""
import json
import shutil

import pytest

from api_request import chat_turn
from conftest import client, raw, running_server
from tokenizer import load_tokenizer
from tools import ToolCallText, parse_tool_calls

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("openai")

# A ChatML template in the Hermes tool format, as Qwen2.5's and others' are: tools listed in the system turn,
# each call a <tool_call> block, each result a <tool_response> in a user turn.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call functions. Their signatures, within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each call, write a JSON object with the function's name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <arguments-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def hermes_dir(smollm2_dir, tmp_path_factory):
    """SmolLM2's checkpoint under the Hermes-style template."""
    directory = tmp_path_factory.mktemp("hermes") / "SmolLM2-tools"
    shutil.copytree(smollm2_dir, directory)
    (directory / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def tools_server(hermes_dir):
    yield from running_server(hermes_dir, slots=4)


def test_tools_and_past_calls_render_as_transformers_renders_them(hermes_dir, smollm2_reference_tokenizer):
    from transformers import PreTrainedTokenizerFast

    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    conversation = [{"role": "system", "content": "Be brief."}, *ASK,
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    ours = load_tokenizer(hermes_dir).render_chat([chat_turn(message) for message in conversation], tools=TOOLS)
    reference = PreTrainedTokenizerFast(tokenizer_object=smollm2_reference_tokenizer)
    as_transformers_takes_it = [*conversation[:2], {"role": "assistant", "content": "", "tool_calls": [{
        "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        conversation[3]]
    assert ours == reference.apply_chat_template(as_transformers_takes_it, tools=TOOLS, chat_template=HERMES_TEMPLATE,
                                                 tokenize=False, add_generation_prompt=True)
    assert '"city": "Paris"' in ours and "get_time" in ours


def test_a_required_call_parses_and_keeps_to_the_parameters_of_its_function(tools_server):
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for seed in range(4):
        choice = client(tools_server[0]).chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=seed,
            max_tokens=200).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])


def test_a_named_function_is_the_one_called(tools_server):
    choice = client(tools_server[0]).chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, temperature=0, max_tokens=200).choices[0]
    assert [call.function.name for call in choice.message.tool_calls] == ["get_time"]
    assert set(json.loads(choice.message.tool_calls[0].function.arguments)) == {"zone"}


def test_a_streamed_call_equals_the_whole_one(tools_server):
    options = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=7,
                   max_tokens=200)
    whole = client(tools_server[0]).chat.completions.create(**options).choices[0]
    calls, reasons = {}, []
    for chunk in client(tools_server[0]).chat.completions.create(stream=True, **options):
        delta = chunk.choices[0].delta
        assert not delta.content
        for call in delta.tool_calls or []:
            calls[call.index] = (call.function.name, call.function.arguments)
        reasons.append(chunk.choices[0].finish_reason)
    assert [calls[index] for index in sorted(calls)] == [(call.function.name, call.function.arguments)
                                                         for call in whole.message.tool_calls]
    assert reasons[-1] == "tool_calls"


def test_the_next_turn_answers_from_the_call_and_its_result(tools_server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    choice = client(tools_server[0]).chat.completions.create(
        model="m", messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30).choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_auto_shows_the_text_before_a_call_and_reads_the_call_when_the_answer_ends():
    text = ToolCallText()
    shown = [text.push(piece) for piece in ["Let me check. <tool", "_call>\n{\"name\": \"get_time\", ",
                                            "\"arguments\": {\"zone\": \"UTC\"}}\n</tool_call>"]]
    assert shown == ["Let me check. ", "", ""]
    assert text.calls() == [("get_time", {"zone": "UTC"})]
    plain = ToolCallText()
    assert plain.push("2 < 3 and <tool") == "2 < 3 and " and plain.calls() is None and plain.rest() == "<tool"


def test_a_block_that_is_not_a_call_leaves_the_text_an_answer():
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>') == [("f", {})]
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>") is None
    assert parse_tool_calls('<tool_call>\n{"name": "f"}\n</tool_call>') is None


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"function": {
        "name": "get_time", "arguments": "{not json"}}]}]}, "messages"),
])
def test_bad_tool_fields_are_400s_naming_the_field(tools_server, body, param):
    status, answer, _ = raw(tools_server[0], "POST", "/v1/chat/completions", {"messages": ASK, **body})
    assert (status, answer["error"]["param"]) == (400, param)


def test_tools_for_a_template_that_takes_none_are_a_400(smollm2_dir):
    for http_server, *_ in running_server(smollm2_dir, slots=1):
        status, answer, _ = raw(http_server, "POST", "/v1/chat/completions", {"messages": ASK, "tools": TOOLS})
        assert (status, answer["error"]["param"]) == (400, "tools")
