"""The server: the engine's batched, chunked, slot-by-slot decoding gives each request what generate() gives
it alone; the HTTP layer answers the official `openai` client, streams, stops, seeds and refuses bad input
with the status that names it. Every server listens on 127.0.0.1 and stops inside its test."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

import api
import quantized_kv_cache
import serve
from checkpoint import load_model
from conftest import ROOT, client, greedy_alone, raw, run_engine, running_server
from engine import Busy, Engine, ModelRunner, Request
from prepare import CompiledExperts, prepare
from sampling import Sampling
from scheduler import FirstComeFirstServed, SkipJoinMLFQ
from tokenizer import TextStream, load_tokenizer

openai = pytest.importorskip("openai")


@pytest.mark.parametrize("kv_cache", ["float", "int8", "int4"])
@pytest.mark.parametrize("static_rows", [False, True])
def test_requests_sharing_slots_each_get_what_they_get_alone(tiny_dir, static_rows, kv_cache):
    # alone and sharing, with the same cache
    model = quantized_kv_cache.use(prepare(load_model(tiny_dir), "cpu"), kv_cache)
    prompts = [[5, 17, 33], list(range(40, 140)), [9], [200, 3, 77, 12, 1, 60], list(range(100, 170))]
    lengths = [12, 7, 20, 3, 15]
    expected = [greedy_alone(model, prompt, n) for prompt, n in zip(prompts, lengths)]
    # 2 slots for 5 requests: later ones join as earlier ones finish; prompts of 100 and 70 tokens are
    # prefilled 32 tokens a step while the other slot keeps decoding
    engine = Engine(ModelRunner(model, rows=2, max_seq_length=256), FirstComeFirstServed(), prefill_chunk=32,
                    static_rows=static_rows)
    results = run_engine(engine, [Request(p, n) for p, n in zip(prompts, lengths)])
    assert results == [(ids, "length") for ids in expected]


def test_a_stop_token_ends_a_request_and_is_not_sent(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    prompt = [5, 17, 33]
    alone = greedy_alone(model, prompt, 10)
    stop = alone[4]
    engine = Engine(ModelRunner(model, rows=1, max_seq_length=256), FirstComeFirstServed())
    [(ids, reason)] = run_engine(engine, [Request(prompt, 10, stop_ids=frozenset([stop]))])
    assert (ids, reason) == (alone[:alone.index(stop)], "stop")


def test_a_seeded_request_samples_the_same_tokens_whatever_runs_beside_it(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    sampling = Sampling(temperature=1.0, top_k=None)
    alone = run_engine(Engine(ModelRunner(model, rows=1, max_seq_length=256), FirstComeFirstServed()),
                       [Request([5, 17], 12, sampling, seed=7)])
    crowded = run_engine(Engine(ModelRunner(model, rows=3, max_seq_length=256), FirstComeFirstServed()), [
        Request([9, 9, 9], 12, sampling, seed=1), Request([5, 17], 12, sampling, seed=7),
        Request([40, 41], 12, sampling)])
    assert crowded[1] == alone[0]
    assert crowded[0][0] != alone[0][0]  # another seed, another draw


def test_a_preempted_request_resumes_where_it_was_and_both_get_what_they_get_alone(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    long_prompt, short_prompt = list(range(40, 100)), [7, 8, 9]
    expected = [greedy_alone(model, long_prompt, 40), greedy_alone(model, short_prompt, 5)]
    # every iteration uses up a quantum, so the long request sinks to the last queue while it runs; the short
    # one joins the top queue and takes the only slot from it
    scheduler = SkipJoinMLFQ(base_seconds=1e-9, prefill_seconds=lambda length: 0.0, queues=4)
    engine = Engine(ModelRunner(model, rows=1, max_seq_length=256), scheduler, prefill_chunk=16)
    loop = threading.Thread(target=engine.run)
    loop.start()
    try:
        long_request, short_request = Request(long_prompt, 40), Request(short_prompt, 5)
        engine.submit(long_request)
        long_ids = [long_request.events.get(timeout=60) for _ in range(5)]
        engine.submit(short_request)
        results = []
        for request, ids in ((short_request, []), (long_request, long_ids)):
            while not isinstance(event := request.events.get(timeout=60), str):
                ids.append(event)
            results.append(ids)
    finally:
        engine.stop()
        loop.join(60)
    assert results == [expected[1], expected[0]]
    assert engine.counts["preemptions"] >= 1 and engine.counts["swaps_in"] == engine.counts["preemptions"]


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_a_mixed_pass_gives_the_logits_of_its_decode_step_and_its_chunk_apart(tiny_dir, kv_cache):
    """mixed_step.py: two rows decoding and a third row's prompt chunk in one pass, against the same decode step
    and the same chunk run as two passes on a copy of the cache."""
    model = quantized_kv_cache.use(prepare(load_model(tiny_dir), "cpu"), kv_cache)
    runner = ModelRunner(model, rows=3, max_seq_length=128)
    for row, prompt in enumerate([list(range(10, 30)), list(range(50, 62))]):
        runner.prefill(row, prompt, 0, 128)
    runner.prefill(2, list(range(70, 80)), 0, 128)  # the first chunk of row 2's prompt
    saved = [buffer.clone() for buffer in model.buffers()]
    decode = ([7, 9], [20, 12], 128)
    chunk = (2, list(range(80, 96)), 10, 128)
    with torch.no_grad():
        mixed, mixed_chunk = runner.mixed(*decode, *chunk)
        for buffer, kept in zip(model.buffers(), saved):
            buffer.copy_(kept)
        apart, apart_chunk = runner.decode_rows(*decode), runner.prefill(*chunk)
    torch.testing.assert_close(mixed, apart, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed_chunk, apart_chunk, rtol=1e-4, atol=1e-4)


def test_each_request_is_charged_the_time_of_the_work_done_for_it(tiny_dir):
    """What MLFQ's clock counts: a prompt's chunk is charged to that request alone, a decode step to the
    requests it decoded, and a pass that does both is shared by its tokens, so a decoding request does not pay
    for another's prefill."""
    charged = []  # each charge: the prompt lengths of the requests charged, and the seconds

    class Recording(FirstComeFirstServed):
        def charge(self, running: list, seconds: float, now: float):
            charged.append((sorted(len(request.prompt) for request in running), seconds))

    runner = ModelRunner(prepare(load_model(tiny_dir), "cpu"), rows=2, max_seq_length=256)
    engine = Engine(runner, Recording(), prefill_chunk=16, mixed_chunk=16)
    run_engine(engine, [Request([5, 17, 33], 4), Request(list(range(40, 80)), 2)])
    # A (3 tokens) is prefilled alone; B's 40 tokens go in 3 chunks (16, 16, 8), each in one pass with A's decode
    # step; a request that has just made its last token is not charged (A in the 4th pass, B in the 5th)
    assert [lengths for lengths, _ in charged] == [[3], [40], [3], [40], [3], [40]]
    for (_, chunk_seconds), (_, decode_seconds) in (charged[1:3], charged[3:5]):
        assert chunk_seconds == pytest.approx(16 * decode_seconds)


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_a_request_that_continues_an_ended_one_prefills_only_what_is_new(tiny_dir, kv_cache):
    """A chat's next turn: the ended request's row keeps its tokens (prompt and answer, all but the last token,
    never fed back), and the next prompt that starts with them prefills only the rest, yet gets the tokens a
    cold prefill gets."""
    model = quantized_kv_cache.use(prepare(load_model(tiny_dir), "cpu"), kv_cache)
    first_prompt = list(range(40, 100))
    answer = greedy_alone(model, first_prompt, 8)
    second_prompt = first_prompt + answer + [7, 8, 9]
    expected = greedy_alone(model, second_prompt, 6)
    engine = Engine(ModelRunner(model, rows=1, max_seq_length=256), FirstComeFirstServed(), prefill_chunk=16)
    first, second = Request(first_prompt, 8), Request(second_prompt, 6)
    assert run_engine(engine, [first, second]) == [(answer, "length"), (expected, "length")]
    assert (first.cached_tokens, second.cached_tokens) == (0, 60 + 7)
    assert (engine.counts["cached_prompt_tokens"], engine.counts["prompt_tokens"]) == (67, 60 + 4)


def test_a_new_request_takes_the_free_row_that_shares_most_of_its_prompt(tiny_dir):
    model = prepare(load_model(tiny_dir), "cpu")
    engine = Engine(ModelRunner(model, rows=2, max_seq_length=128), FirstComeFirstServed())
    earlier = [Request(list(range(10, 30)), 2), Request(list(range(50, 70)), 2)]
    later = Request(list(range(50, 60)) + [3, 4], 2)  # the second's first 10 tokens, then its own
    for requests in (earlier, [later]):
        for request in requests:
            engine.submit(request)
        while engine.scheduler.jobs:
            engine.iteration()
    assert later.cached_tokens == 10 and engine.rows == [None, None]
    assert [event for event in iter(later.events.get_nowait, "length")] == greedy_alone(model, later.prompt, 2)


@pytest.mark.parametrize("kv_cache", ["float", "int4"])
def test_requests_that_arrive_together_with_one_prompt_prefill_it_once(tiny_dir, kv_cache):
    """The second of two requests with one prompt copies the first's cache slots instead of computing them, and
    gets what it gets alone; a third with a longer prompt copies the shared part and prefills its own."""
    model = quantized_kv_cache.use(prepare(load_model(tiny_dir), "cpu"), kv_cache)
    prompt = list(range(40, 140))
    engine = Engine(ModelRunner(model, rows=3, max_seq_length=256), FirstComeFirstServed(), prefill_chunk=32)
    requests = [Request(prompt, 5), Request(prompt, 5), Request(prompt + [7, 8], 5)]
    expected = [greedy_alone(model, request.prompt, 5) for request in requests]
    assert run_engine(engine, requests) == [(ids, "length") for ids in expected]
    assert [request.cached_tokens for request in requests] == [0, 99, 100]
    assert engine.counts["prompt_tokens"] == 100 + 1 + 2


def test_more_waiting_requests_than_allowed_are_refused(tiny_dir):
    # its loop not running
    runner = ModelRunner(prepare(load_model(tiny_dir), "cpu"), rows=1, max_seq_length=64)
    engine = Engine(runner, FirstComeFirstServed(), max_waiting=1)
    engine.submit(Request([1], 1))  # the free slot will take it
    engine.submit(Request([2], 1))  # waits
    with pytest.raises(Busy):
        engine.submit(Request([3], 1))


def test_text_stream_holds_back_what_may_start_a_stop_string(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog")
    stream = TextStream(tokenizer, ["fox jumps"])
    shown = "".join(stream.push(token) for token in ids) + stream.flush()
    assert (shown, stream.stopped) == ("the quick brown ", True)
    held = TextStream(tokenizer, ["lazy cat"])
    shown = "".join(held.push(token) for token in ids) + held.flush()
    assert (shown, held.stopped) == ("the quick brown fox jumps over the lazy dog", False)


@pytest.fixture
def server(tiny_dir):
    """serve.py's server over the tiny model, 3 slots, on a free port of 127.0.0.1: (server, engine, tokenizer,
    model). Stopped after the test."""
    yield from running_server(tiny_dir, slots=3)


def test_a_completion_through_the_openai_client_is_the_greedy_text(server):
    http_server, engine, tokenizer, model = server
    prompt = "the quick brown fox"
    ids = greedy_alone(model, tokenizer.encode(prompt), 12)
    completion = client(http_server).completions.create(model="tiny-llama", prompt=prompt, max_tokens=12,
                                                        temperature=0, extra_body={"ignore_eos": True})
    assert completion.choices[0].text == tokenizer.decode(ids)
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(tokenizer.encode(prompt)), 12)


def test_a_streamed_chat_equals_the_whole_one_and_reports_usage(server):
    http_server, *_ = server
    messages = [{"role": "user", "content": "How are you?"}]
    whole = client(http_server).chat.completions.create(model="tiny-llama", messages=messages, max_tokens=15,
                                                        temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client(http_server).chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=15, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content and text
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_stop_string_ends_the_text_before_it(server):
    http_server, engine, tokenizer, model = server
    full = client(http_server).completions.create(model="m", prompt="Hello world", max_tokens=30, temperature=0,
                                                  extra_body={"ignore_eos": True}).choices[0].text
    stop = full[10:13]
    for stream in (False, True):
        answer = client(http_server).completions.create(model="m", prompt="Hello world", max_tokens=30,
                                                        temperature=0, stop=[stop], stream=stream,
                                                        extra_body={"ignore_eos": True})
        pieces = list(answer) if stream else [answer]
        text = "".join(piece.choices[0].text for piece in pieces)
        assert text == full[:full.index(stop)]
        assert pieces[-1].choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_text(server):
    http_server, *_ = server
    texts = [client(http_server).completions.create(model="m", prompt="the lazy dog", max_tokens=20, temperature=1,
                                                    seed=seed, extra_body={"ignore_eos": True}).choices[0].text
             for seed in (3, 3, 4)]
    assert texts[0] == texts[1] != texts[2]


def test_a_second_chat_turn_reports_the_prompt_tokens_it_reused(server):
    http_server, engine, tokenizer, model = server
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    first = client(http_server).chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0,
                                                        extra_body={"ignore_eos": True})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the sky?"}]
    second = client(http_server).chat.completions.create(model="m", messages=messages, max_tokens=10,
                                                         temperature=0, extra_body={"ignore_eos": True})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < reused < second.usage.prompt_tokens
    assert "brisk_cached_prompt_tokens_total %d" % reused in raw(http_server, "GET", "/metrics")[1].decode()


def test_n_choices_of_a_greedy_request_each_equal_the_single_answer(server):
    http_server, engine, tokenizer, model = server
    prompt = "the quick brown fox"
    single = client(http_server).completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0,
                                                    extra_body={"ignore_eos": True})
    three = client(http_server).completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0, n=3,
                                                   extra_body={"ignore_eos": True})
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert {choice.text for choice in three.choices} == {single.choices[0].text}
    assert (three.usage.prompt_tokens, three.usage.completion_tokens) == (single.usage.prompt_tokens, 3 * 8)


def test_n_seeded_choices_differ_from_each_other_and_repeat_with_the_seed(server):
    http_server = server[0]
    answers = [client(http_server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=1, seed=5, n=3,
        extra_body={"ignore_eos": True}) for _ in range(2)]
    texts = [[choice.message.content for choice in answer.choices] for answer in answers]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3


def test_n_streamed_choices_equal_the_whole_ones(server):
    http_server = server[0]
    options = dict(model="m", prompt="the lazy dog", max_tokens=6, temperature=1, seed=2, n=2,
                   extra_body={"ignore_eos": True})
    whole = client(http_server).completions.create(**options)
    texts, reasons = ["", ""], [None, None]
    for chunk in client(http_server).completions.create(stream=True, **options):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [choice.text for choice in whole.choices] and reasons == ["length", "length"]


def test_a_logit_bias_and_a_frequency_penalty_steer_the_answer(server):
    http_server, engine, tokenizer, model = server
    prompt = "the quick brown fox"
    forced = client(http_server).completions.create(model="m", prompt=prompt, max_tokens=5, temperature=0,
                                                    logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert tokenizer.encode(forced.choices[0].text, bos=False) == [42] * 5
    greedy = greedy_alone(model, tokenizer.encode(prompt), 12)
    penalized = client(http_server).completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0,
                                                       frequency_penalty=2, extra_body={"ignore_eos": True})
    assert len(set(tokenizer.encode(penalized.choices[0].text, bos=False))) > len(set(greedy))


def reference_logprobs(model, prompt: list, tokens: list):
    """log_softmax of the logits a full forward over the prompt and the tokens gives each token's position."""
    model.setup_caches(1, model.args.max_seq_length)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]]), torch.arange(len(prompt) + len(tokens) - 1))
    return logits[0, len(prompt) - 1:].float().log_softmax(-1)


def test_chat_logprobs_are_the_models_log_softmax_of_each_greedy_token(server):
    http_server, engine, tokenizer, model = server
    messages = [{"role": "user", "content": "How are you?"}]
    prompt = tokenizer.encode(tokenizer.render_chat(messages))
    tokens = greedy_alone(model, prompt, 8)
    expected = reference_logprobs(model, prompt, tokens)
    for stream in (False, True):
        reply = client(http_server).chat.completions.create(
            model="m", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=stream,
            extra_body={"ignore_eos": True})
        content = ([entry for chunk in reply for entry in chunk.choices[0].logprobs.content] if stream
                   else reply.choices[0].logprobs.content)
        assert [entry.token for entry in content] == [tokenizer.decode([token]) for token in tokens]
        assert max(abs(entry.logprob - expected[i, token].item())
                   for i, (entry, token) in enumerate(zip(content, tokens))) <= 1e-4
        assert all(len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token for entry in content)


def test_completion_logprobs_come_as_parallel_lists(server):
    http_server, engine, tokenizer, model = server
    prompt = tokenizer.encode("the quick brown fox")
    tokens = greedy_alone(model, prompt, 6)
    expected = reference_logprobs(model, prompt, tokens)
    logprobs = client(http_server).completions.create(model="m", prompt="the quick brown fox", max_tokens=6,
                                                      temperature=0, logprobs=2,
                                                      extra_body={"ignore_eos": True}).choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([token]) for token in tokens]
    assert torch.allclose(torch.tensor(logprobs.token_logprobs), expected[torch.arange(6), tokens], atol=1e-4)
    assert all(len(top) == 2 and max(top, key=top.get) == token for top, token in zip(logprobs.top_logprobs,
                                                                                       logprobs.tokens))


def test_ignore_eos_bans_the_end_of_text_tokens_as_llama_server_does(server):
    """A logit bias that makes the end-of-text token the likeliest: it ends the answer at once, and with
    ignore_eos it is never picked, so the text goes on."""
    http_server, engine, tokenizer, model = server
    eos = tokenizer.stop_ids[0]
    ended = client(http_server).completions.create(model="m", prompt="the", max_tokens=8, temperature=0,
                                                   logit_bias={str(eos): 100})
    assert (ended.choices[0].finish_reason, ended.usage.completion_tokens) == ("stop", 1)
    going = client(http_server).completions.create(model="m", prompt="the", max_tokens=8, temperature=0,
                                                   logit_bias={str(eos): 100}, extra_body={"ignore_eos": True})
    assert (going.choices[0].finish_reason, going.usage.completion_tokens) == ("length", 8)
    assert not set(tokenizer.encode(going.choices[0].text, bos=False)) & set(tokenizer.stop_ids)


def test_health_models_and_metrics(server):
    http_server, *_ = server
    assert raw(http_server, "GET", "/health")[:2] == (200, {"status": "ok"})
    assert [model.id for model in client(http_server).models.list()] == ["tiny-llama"]
    client(http_server).completions.create(model="m", prompt="the", max_tokens=4, extra_body={"ignore_eos": True})
    metrics = raw(http_server, "GET", "/metrics")[1].decode().splitlines()
    for line in ('brisk_requests_total{outcome="length"} 1', "brisk_completion_tokens_total 4",
                 'brisk_waiting{queue="0"} 0', "brisk_running 0", "brisk_time_to_first_token_seconds_count 1",
                 "brisk_inter_token_latency_seconds_count 3", 'brisk_inter_token_latency_seconds_bucket{le="+Inf"} 3'):
        assert line in metrics


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ([1, 2], 400, None),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"prompt": "hi", "n": 9}, 400, "n"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}},
     400, "response_format"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}}},
     400, "response_format"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
])
def test_bad_requests_are_json_errors_naming_the_field(server, body, status, param):
    answer_status, answer, _ = raw(server[0], "POST", "/v1/completions", body)
    assert answer_status == status
    assert answer["error"]["param"] == param and answer["error"]["message"]


@pytest.mark.parametrize("messages", [[{"content": "hi"}], ["hi"], [{"role": "user", "content": 3}]])
def test_a_malformed_chat_message_is_a_400_naming_messages(server, messages):
    status, answer, _ = raw(server[0], "POST", "/v1/chat/completions", {"messages": messages})
    assert (status, answer["error"]["param"]) == (400, "messages")


def test_top_logprobs_without_logprobs_is_a_400(server):
    status, answer, _ = raw(server[0], "POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert (status, answer["error"]["param"]) == (400, "top_logprobs")


def test_a_body_larger_than_the_cap_is_refused_with_413_unread(server):
    status, answer, headers = raw(server[0], "POST", "/v1/completions", {"prompt": "hi"},
                                  {"Content-Length": "10000000000000"})
    assert (status, headers.get("Connection")) == (413, "close") and "--max_request_bytes" in answer["error"]["message"]


def test_the_chat_page_is_served_at_the_root(server):
    status, page, headers = raw(server[0], "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<title>brisk chat</title>" in page and b'fetch("/v1/chat/completions"' in page


def test_options_head_and_a_models_retrieval(server):
    http_server = server[0]
    status, _, headers = raw(http_server, "OPTIONS", "/v1/chat/completions")
    assert (status, headers["Allow"]) == (204, "GET, HEAD, POST, OPTIONS")
    assert "Access-Control-Allow-Origin" not in headers
    status, body, headers = raw(http_server, "HEAD", "/health")  # GET's headers: {"status": "ok"} is 16 bytes
    assert (status, body, headers["Content-Length"]) == (200, b"", "16")
    assert client(http_server).models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client(http_server).models.retrieve("gpt-4")


def test_a_cors_origin_is_named_only_when_given(tiny_dir):
    for http_server, *_ in running_server(tiny_dir, slots=1, cors_origin="http://localhost:3000"):
        headers = raw(http_server, "OPTIONS", "/v1/completions")[2]
        assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert raw(http_server, "GET", "/health")[2]["Access-Control-Allow-Origin"] == "http://localhost:3000"


def test_tokenize_and_detokenize_as_llama_server_does(server):
    http_server, engine, tokenizer, model = server
    text = "the quick brown fox"
    status, answer, _ = raw(http_server, "POST", "/tokenize", {"content": text})
    assert (status, answer["tokens"]) == (200, tokenizer.encode(text, bos=False))
    assert raw(http_server, "POST", "/tokenize", {"content": text, "add_special": True})[1]["tokens"] == \
        tokenizer.encode(text)
    assert raw(http_server, "POST", "/detokenize", {"tokens": answer["tokens"]})[1] == {"content": text}
    status, answer, _ = raw(http_server, "POST", "/detokenize", {"tokens": [tokenizer.vocab_size]})
    assert (status, answer["error"]["param"]) == (400, "tokens")


def test_an_idle_connection_is_closed_after_the_timeout(tiny_dir):
    for http_server, *_ in running_server(tiny_dir, slots=1, limits=api.Limits(idle_timeout_s=0.3)):
        with socket.create_connection(("127.0.0.1", http_server.server_port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""  # the server closed it
            assert 0.2 < time.monotonic() - started < 5


def test_connections_past_the_limit_get_a_json_503(tiny_dir):
    for http_server, *_ in running_server(tiny_dir, slots=1, limits=api.Limits(max_connections=1)):
        with socket.create_connection(("127.0.0.1", http_server.server_port), timeout=10):  # holds the only one
            time.sleep(0.2)
            status, answer, _ = raw(http_server, "GET", "/health")
        assert (status, answer["error"]["type"]) == (503, "server_error")
        deadline, status = time.monotonic() + 10, None  # free again once the server has seen the first one close
        while status != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
            status = raw(http_server, "GET", "/health")[0]
        assert status == 200


def test_a_failure_inside_the_server_is_a_json_500_and_a_logged_traceback(server, monkeypatch, capsys):
    monkeypatch.setattr(api.Handler, "health", lambda self: 1 / 0)
    status, answer, _ = raw(server[0], "GET", "/health")
    assert (status, answer["error"]["type"]) == (500, "server_error")
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_a_connection_that_fails_between_requests_is_at_most_one_line(server, capsys):
    for error in (ConnectionResetError(104, "Connection reset by peer"), ValueError("odd bytes")):
        try:
            raise error
        except Exception:
            server[0].handle_error(None, ("127.0.0.1", 5000))
    assert capsys.readouterr().err == "serve.py: connection from 127.0.0.1: ValueError: odd bytes\n"


def test_a_client_that_leaves_a_whole_request_cancels_it(tiny_dir):
    for http_server, engine, *_ in running_server(tiny_dir, slots=1, loop=False):
        connection = http.client.HTTPConnection("127.0.0.1", http_server.server_port, timeout=60)
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "the", "max_tokens": 50}))
        deadline = time.monotonic() + 30
        while not engine.scheduler.jobs and time.monotonic() < deadline:  # it waits: the loop is not running
            time.sleep(0.05)
        [job] = engine.scheduler.jobs.values()
        connection.sock.close()
        while job.request.cancelled is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.request.cancelled == "cancelled"


def test_unknown_paths_and_methods(server):
    assert raw(server[0], "GET", "/v2/anything")[0] == 404
    assert raw(server[0], "GET", "/v1/completions")[0] == 405
    assert raw(server[0], "DELETE", "/v1/models")[0] == 405


def test_a_key_is_required_once_one_is_set(tiny_dir):
    for http_server, *_ in running_server(tiny_dir, slots=1, api_key="sesame"):
        with pytest.raises(openai.AuthenticationError):
            client(http_server, api_key="wrong").models.list()
        assert [model.id for model in client(http_server, api_key="sesame").models.list()] == ["tiny-llama"]


def test_too_many_waiting_requests_get_429_with_retry_after(tiny_dir):
    for http_server, engine, *_ in running_server(tiny_dir, slots=1, max_waiting=0, loop=False):
        engine.submit(Request([1], 1))  # takes the only slot (the loop is not running: it stays there)
        status, answer, headers = raw(http_server, "POST", "/v1/completions", {"prompt": "hi"})
        assert (status, answer["error"]["type"], headers.get("Retry-After")) == (429, "rate_limit_error", "1")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    http_server, engine, *_ = server
    connection = http.client.HTTPConnection("127.0.0.1", http_server.server_port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "the", "max_tokens": 200, "stream": True, "ignore_eos": True}))
    response = connection.getresponse()
    assert response.status == 200 and response.fp.readline()  # the first event's chunk has come
    connection.sock.close()
    connection.close()
    deadline = time.monotonic() + 30
    while engine.counts["requests_cancelled"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.counts["requests_cancelled"] == 1 and engine.snapshot().running == 0


def test_bad_arguments_are_one_line_and_status_2(capsys):
    assert serve.main(["--slots", "0"]) == 2
    assert capsys.readouterr().err == "error: --slots must be at least 1, not 0\n"


@pytest.mark.slow
def test_smollm2_chats_in_a_busy_server_equal_each_alone(smollm2_dir):
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colours.",
                 "What is 12 times 12?", "Say hello in Spanish."]
    model, tokenizer = prepare(load_model(smollm2_dir), "cpu"), load_tokenizer(smollm2_dir)
    prompts = [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": q}])) for q in questions]
    alone = [greedy_alone(model, prompt, 24) for prompt in prompts]
    engine = Engine(ModelRunner(model, rows=3, max_seq_length=512), FirstComeFirstServed(), prefill_chunk=16)
    results = run_engine(engine, [Request(prompt, 24) for prompt in prompts])
    assert [ids for ids, _ in results] == alone


def start_server(*command) -> tuple:
    """serve.py's command line run in a session of its own, on a free port: the process and its port."""
    process = subprocess.Popen([*command, "--port", "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    # "serving tiny-llama on http://127.0.0.1:PORT/v1 (2 slots)", after whatever torchrun says first
    while "serving" not in (line := process.stderr.readline()):
        assert line, "the server exited before serving"
    return process, int(line.split(":")[2].split("/")[0])


def metrics(port: int) -> dict:
    """The server's /metrics as {sample: value} ('brisk_waiting{queue="0"}': 0.0, ...)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def interrupt(process: subprocess.Popen) -> int:
    """Ctrl-C, as a terminal sends it: SIGINT to every process of the session; the exit status."""
    os.killpg(process.pid, signal.SIGINT)
    return process.wait(timeout=60)


@pytest.mark.slow
def test_the_command_serves_with_mlfq_until_interrupted(tiny_dir):
    process, port = start_server(sys.executable, "serve.py", "--checkpoint_path", tiny_dir, "--slots", "2")
    try:
        answer = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=60).completions.create(model="m", prompt="the", max_tokens=3)
        assert answer.usage.completion_tokens <= 3
        assert metrics(port)['brisk_waiting{queue="5"}'] == 0  # six queues: MLFQ is the default
    finally:
        assert interrupt(process) == 0


@pytest.mark.slow
@pytest.mark.parametrize("compile_flag", [[], ["--compile", "--dtype", "fp32"]], ids=["eager", "compiled"])
def test_a_tensor_parallel_server_preempts_and_answers_as_one_process(tiny_dir, compile_flag):
    """Two ranks under torchrun, one slot: a long completion streams, a short one preempts it (its KV rows are
    swapped out and back on each rank, each holding its half of the heads), and both texts equal generate()'s
    greedy ones in one process; the other rank compiles its steps as rank 0 does."""
    model, tokenizer = prepare(load_model(tiny_dir), "cpu"), load_tokenizer(tiny_dir)
    long_ids, short_ids = tokenizer.encode("the"), tokenizer.encode("and so")
    expected = [tokenizer.decode(greedy_alone(model, ids, n)) for ids, n in ((long_ids, 200), (short_ids, 8))]
    process, port = start_server(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "serve.py", "--checkpoint_path", tiny_dir, "--slots", "1", *compile_flag)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.completions.create(model="m", prompt="the", max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        for _ in range(400):  # until it has run 16 steps, and so left the top queues (bounded: 20 s)
            if metrics(port)["brisk_completion_tokens_total"] >= 16:
                break
            time.sleep(0.05)
        short = client.completions.create(model="m", prompt="and so", max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
        long_text = "".join(chunk.choices[0].text for chunk in stream)
        counts = metrics(port)
        assert (counts["brisk_preemptions_total"], counts["brisk_swaps_in_total"]) == (1, 1)
        assert [long_text, short.choices[0].text] == expected
    finally:
        interrupt(process)  # torchrun itself exits 1 on SIGINT; its ranks stop cleanly, and together
        assert "serve.py" not in process.stderr.read()  # a rank's traceback, or torchrun naming one that failed


def test_a_compiled_server_runs_the_model_a_compiled_generate_runs(tiny_mixtral_dir):
    """serve.py --compile prepares its model as generate.py --compile does (prepare.prepare, step "compiled"):
    the same forms of every layer, in the same dtype."""
    args = serve.parse_args(["--checkpoint_path", str(tiny_mixtral_dir), "--device", "cpu", "--compile"])
    runner = serve.load(args)[1]
    model = runner.model
    expected = prepare(load_model(tiny_mixtral_dir, "cpu", torch.bfloat16), "cpu", "compiled")
    expected.setup_caches(runner.rows, runner.max_seq_length)
    assert [type(module) for module in model.modules()] == [type(module) for module in expected.modules()]
    assert isinstance(model.layers[0].feed_forward.experts, CompiledExperts)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
