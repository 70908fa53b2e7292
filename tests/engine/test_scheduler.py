"""Continuous batching: answers do not depend on the batch, the prefix cache or when rows join and leave."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from openmedgemma.engine import GenerationConfig
from openmedgemma.engine.scheduler import ContextTooLong, QueueFull, Scheduler
from openmedgemma.engine.sequences import Finished, Request
from openmedgemma.errors import OpenMedGemmaError

CXR = str(Path(__file__).resolve().parents[2] / "examples" / "cxr_nih_00000001_000.png")
QUESTIONS = ["Is there cardiomegaly?", "What organ is shown?", "Is the liver normal?", "Describe the image.",
             "Is there a fracture here?", "Is this an MRI?"]  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    from openmedgemma.bundled import nano_path
    from openmedgemma.engine import Engine

    return Engine.from_pretrained(nano_path("medgemma"))


def conversation(i: int, system: str = "") -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    q = QUESTIONS[i % len(QUESTIONS)]
    if i % 2:
        return head + [{"role": "user", "content": [{"type": "image", "image": CXR}, {"type": "text", "text": q}]}]
    return head + [{"role": "user", "content": q}]


def run_all(scheduler, engine, convs, configs, **request_kwargs) -> list[Finished]:
    """Submit everything at once; wait for every Finished event (its `.all_logprobs`: every token's logprob
    when logprobs were asked for)."""
    done: dict[int, Finished] = {}
    logprobs: dict[int, list[float]] = {i: [] for i in range(len(convs))}
    event = threading.Event()

    def handler(i):
        def on_event(e):
            logprobs[i] += [lp.logprob for lp in e.logprobs or []]
            if isinstance(e, Finished):
                e.all_logprobs = logprobs[i]
                done[i] = e
                if len(done) == len(convs):
                    event.set()
        return on_event

    for i, (conv, config) in enumerate(zip(convs, configs)):
        scheduler.submit(Request(engine.prepare(conv), config, handler(i), **request_kwargs))
    assert event.wait(120)
    return [done[i] for i in range(len(convs))]


def solo(engine, conv, config, **kw) -> Finished:
    scheduler = Scheduler(engine, max_batch=1, prefix_cache_bytes=0).start()
    try:
        return run_all(scheduler, engine, [conv], [config], **kw)[0]
    finally:
        scheduler.stop()


def solo_tokens(engine, conv, config, **kw) -> list[int]:
    return solo(engine, conv, config, **kw).result.token_ids


def test_batched_rows_joining_and_leaving_give_the_tokens_of_each_alone(engine):
    convs = [conversation(i) for i in range(12)]
    configs = [GenerationConfig(max_new_tokens=6 + 3 * (i % 5)) for i in range(12)]  # rows retire at other steps
    scheduler = Scheduler(engine, max_batch=5, prefill_budget=40, prefix_cache_bytes=0).start()  # joins mid-decode
    try:
        batched = run_all(scheduler, engine, convs, configs, ignore_eos=True, logprobs=0)
    finally:
        scheduler.stop()
    assert scheduler.steps > 12  # interleaved, not one request at a time
    for conv, config, final in zip(convs, configs, batched):
        alone = solo(engine, conv, config, ignore_eos=True, logprobs=0)
        assert final.result.token_ids == alone.result.token_ids
        assert final.result.new_tokens == config.max_new_tokens
        # the same numbers, not just the same argmax (nano's answers are robust enough to hide a wrong mask)
        assert final.all_logprobs == pytest.approx(alone.all_logprobs, abs=2e-4)


def test_single_row_is_the_engine_generate_path(engine):
    for i in range(4):
        config = GenerationConfig(max_new_tokens=20)
        [alone] = engine.generate([conversation(i)], config)
        assert solo_tokens(engine, conversation(i), config) == alone.token_ids


def test_prefix_cache_hits_give_the_same_tokens(engine):
    system = "You are an expert radiologist."
    first = [conversation(1, system)]
    second = [[{"role": "system", "content": system}, {"role": "user", "content": [
        {"type": "image", "image": CXR}, {"type": "text", "text": "Is the heart enlarged?"}]}]]  # fmt: skip
    config = [GenerationConfig(max_new_tokens=10)]
    scheduler = Scheduler(engine, max_batch=2).start()
    try:
        a = run_all(scheduler, engine, first, config, ignore_eos=True)[0]
        hits = scheduler.prefixes.hits
        again = run_all(scheduler, engine, first, config, ignore_eos=True)[0]  # whole prompt cached
        assert scheduler.prefixes.hits == hits + 1
        b = run_all(scheduler, engine, second, config, ignore_eos=True)[0]  # system + image prefix cached
        assert scheduler.prefixes.hits == hits + 2
    finally:
        scheduler.stop()
    assert again.result.token_ids == a.result.token_ids
    assert a.result.token_ids == solo_tokens(engine, first[0], config[0], ignore_eos=True)
    assert b.result.token_ids == solo_tokens(engine, second[0], config[0], ignore_eos=True)


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    config = GenerationConfig(max_new_tokens=12, temperature=1.3, top_k=50, seed=11)
    alone = solo_tokens(engine, conversation(0), config, ignore_eos=True)
    scheduler = Scheduler(engine, max_batch=4).start()
    try:
        batch = run_all(scheduler, engine, [conversation(0)] * 4,
                        [config, GenerationConfig(max_new_tokens=12), config, GenerationConfig(max_new_tokens=5)],
                        ignore_eos=True)  # fmt: skip
    finally:
        scheduler.stop()
    assert batch[0].result.token_ids == batch[2].result.token_ids == alone


def test_cancel_frees_the_row(engine):
    scheduler = Scheduler(engine, max_batch=2).start()
    events, finished = [], threading.Event()

    def on_event(e):
        events.append(e)
        if isinstance(e, Finished):
            finished.set()

    request = Request(engine.prepare(conversation(0)), GenerationConfig(max_new_tokens=1500), on_event, ignore_eos=True)
    try:
        scheduler.submit(request)
        while len(events) < 5:
            threading.Event().wait(0.01)
        request.cancel()
        assert finished.wait(30)
        assert events[-1].reason == "cancelled" and events[-1].result is None
        assert scheduler.running == [] and scheduler.prefilling == []
    finally:
        scheduler.stop()


def test_context_and_queue_limits(engine):
    scheduler = Scheduler(engine, max_batch=1, max_queue=1, max_model_len=64)
    prompt = engine.prepare(conversation(0))
    with pytest.raises(ContextTooLong, match=rf"the prompt is {len(prompt.ids)} tokens and 60 new tokens"):
        scheduler.submit(Request(prompt, GenerationConfig(max_new_tokens=60), print))
    for _ in range(2):  # not started: one for the free row, one for the queue
        scheduler.submit(Request(prompt, GenerationConfig(max_new_tokens=4), print))
    with pytest.raises(QueueFull, match="limit 1"):
        scheduler.submit(Request(prompt, GenerationConfig(max_new_tokens=4), print))


def test_a_kv_cache_that_cannot_fit_is_refused_before_allocating(engine):
    with pytest.raises(OpenMedGemmaError, match=r"the KV cache for 100000 rows x 2048 tokens needs .* GiB but .* GiB "
                                                r"are free; lower --max-batch or --max-model-len"):
        Scheduler(engine, max_batch=100_000)
    assert Scheduler(engine, max_batch=2).max_model_len == 2048  # nano's context, under the 8192 default cap


def test_prepacked_weights_give_the_same_batched_answers(engine):
    """Engine(prepack_weights=True): decode matmuls through oneDNN's reordered copy; same tokens, same numbers."""
    from openmedgemma.bundled import nano_path
    from openmedgemma.engine import Engine

    prepacked = Engine.from_pretrained(nano_path("medgemma"), prepack_weights=True)
    assert prepacked.decoder.prepack and prepacked.decoder.prepacked_bytes > 0
    convs = [conversation(i) for i in range(6)]
    configs = [GenerationConfig(max_new_tokens=8 + i) for i in range(6)]
    results = []
    for eng in (engine, prepacked):
        scheduler = Scheduler(eng, max_batch=6, prefix_cache_bytes=0).start()
        try:
            results.append(run_all(scheduler, eng, convs, configs, ignore_eos=True, logprobs=0))
        finally:
            scheduler.stop()
    for plain, packed in zip(*results):
        assert packed.result.token_ids == plain.result.token_ids
        assert packed.all_logprobs == pytest.approx(plain.all_logprobs, abs=2e-4)
