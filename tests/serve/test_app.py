"""The HTTP API in process: results equal the library's, errors are 4xx JSON, limits hold."""

import gc
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from aiayn.serve.app import create_app
from aiayn.serve.models import Limits
from aiayn.tasks.lm import stream_text
from aiayn.translate import translate

pytestmark = pytest.mark.usefixtures("one_thread")
SENTENCES = ["A man is riding a bicycle down the street.", "Two dogs play in the snow.", "A woman sings.",
             "Children are playing soccer in a park.", "A cat sleeps on a red sofa."]


def offline(models, sentences, beam=4):
    t = models.translation
    return translate(t.model, t.tokenizer, sentences, beam=beam, alpha=t.alpha)


def test_translate_equals_the_library(client, shipped_models):
    r = client.post("/v1/translate", json={"text": SENTENCES[0]})
    assert r.status_code == 200
    assert r.json() == {"translation": offline(shipped_models, SENTENCES[:1])[0], "model": "en-de"}
    r = client.post("/v1/translate", json={"texts": SENTENCES[:3], "beam": 1})
    assert r.json()["translations"] == offline(shipped_models, SENTENCES[:3], beam=1)


def test_a_paragraph_is_translated_sentence_by_sentence(client, shipped_models):
    text = f"{SENTENCES[0]} {SENTENCES[1]}\n\n  {SENTENCES[2]}"
    one, two, three = offline(shipped_models, SENTENCES[:3])
    assert client.post("/v1/translate", json={"text": text}).json()["translation"] == f"{one} {two}\n\n  {three}"


@pytest.mark.parametrize("body, status, says", [
    ({"text": ""}, 422, "empty"),
    ({"text": " \n "}, 422, "empty"),
    ({}, 422, "either"),
    ({"text": "a", "texts": ["b"]}, 422, "either"),
    ({"texts": []}, 422, "empty list"),
    ({"texts": ["ok", ""]}, 422, "texts[1]"),
    ({"texts": ["x"] * 9}, 413, "limit is 8"),
    ({"text": "x" * 2001}, 413, "limit is 2000"),
    ({"text": 5}, 422, "text"),
    ({"text": "a", "beam": 0}, 422, "beam"),
    ({"text": "a", "beam": 9}, 422, "beam must be <= 8"),
    ({"text": "a", "precision": "fp16"}, 422, "precision must be one of auto, fp32, int8, bf16"),
    ({"text": "a", "colour": "red"}, 422, "colour"),
])
def test_bad_translation_requests_are_4xx_json(client, body, status, says):
    r = client.post("/v1/translate", json=body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_malformed_bodies(client):
    for raw, status in ((b"{bad", 400), (b"[1, 2]", 422), (b'{"text": "\\ud800"}', 422), (b"\xff\xfe", 400)):
        r = client.post("/v1/translate", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (raw, r.text)
        assert r.json()["error"]
    r = client.post("/v1/translate", content=b'{"text": "' + b"a" * 300_000 + b'"}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/translate").json()["error"] == "Method Not Allowed"


def test_odd_characters_translate(client):
    for text in ("\x00\x01 tab\there", "emoji 🚲🚲 and 漢字", "\u200b\u202e"):
        r = client.post("/v1/translate", json={"text": text, "beam": 1})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["translation"], str)


def test_int8_precision(client, shipped_models):
    r = client.post("/v1/translate", json={"text": SENTENCES[1], "precision": "int8"})
    assert r.status_code == 200 and "Hunde" in r.json()["translation"]


def test_libretranslate(client, shipped_models):
    expected = offline(shipped_models, SENTENCES[:2])
    r = client.post("/translate", json={"q": SENTENCES[0], "source": "en", "target": "de", "format": "text"})
    assert r.status_code == 200 and r.json() == {"translatedText": expected[0]}
    r = client.post("/translate", json={"q": SENTENCES[:2], "source": "auto", "target": "de"})
    assert r.json()["translatedText"] == expected and r.json()["detectedLanguage"]["language"] == "en"
    r = client.post("/translate", data={"q": SENTENCES[1], "source": "en", "target": "de"})  # a form, as Weblate sends
    assert r.status_code == 200 and r.json()["translatedText"] == expected[1]
    for body, says in (({"q": "a", "source": "en", "target": "fr"}, "target"),
                       ({"q": "a", "source": "fr", "target": "de"}, "source"),
                       ({"q": "a", "source": "en", "target": "de", "format": "html"}, "format"),
                       ({"q": "", "source": "en", "target": "de"}, "empty"),
                       ({"q": ["a", ""], "source": "en", "target": "de"}, "q[1] is empty"),
                       ({"q": "a", "source": "en"}, "target is required"),
                       ({"source": "en", "target": "de"}, "q")):
        r = client.post("/translate", json=body)
        assert r.status_code == 400 and says in r.json()["error"], r.text
    assert client.post("/translate", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    assert client.get("/languages").json() == [{"code": "en", "name": "English", "targets": ["de"]},
                                               {"code": "de", "name": "German", "targets": []}]


def test_api_key(shipped_models):
    with TestClient(create_app(shipped_models, api_key="s3cret", warmup=False)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200  # the page itself; it asks for the key
        r = c.post("/v1/translate", json={"text": "A dog."})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        lt = {"q": "A dog.", "source": "en", "target": "de"}
        assert c.post("/translate", json=lt).status_code == 403
        assert c.post("/translate", json={**lt, "api_key": "s3cret"}).status_code == 200


def test_generate_equals_the_library_and_is_repeatable(client, shipped_models):
    lm = shipped_models.lm
    greedy = "".join(stream_text(lm.model, lm.tokenizer, "ROMEO:", 30, temperature=0))
    r = client.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_tokens": 30, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["generated_text"] == greedy
    assert r.json()["details"]["finish_reason"] == "length" and r.json()["details"]["generated_tokens"] == 30
    body = {"prompt": "JULIET:", "max_new_tokens": 20, "temperature": 1.0, "top_k": 20, "seed": 7, "top_n_tokens": 3}
    a, b = (client.post("/v1/generate", json=body).json() for _ in range(2))
    assert a == b
    tok = a["details"]["tokens"][0]
    assert len(tok["top_tokens"]) == 3 and tok["top_tokens"][0]["logprob"] >= tok["logprob"] - 1e-4


def test_generate_streams_tgi_events(client):
    body = {"prompt": "ROMEO:", "max_new_tokens": 12, "temperature": 0, "stream": True, "top_n_tokens": 10}
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    tokens = [json.loads(e) for e in events[:-1]]
    assert len(tokens) == 12
    assert all(set(t["token"]) == {"id", "text", "logprob", "special"} and len(t["top_tokens"]) == 10 for t in tokens)
    assert all(t["details"] is None for t in tokens[:-1])
    assert tokens[-1]["details"]["finish_reason"] == "length"
    assert tokens[-1]["generated_text"] == "".join(t["token"]["text"] for t in tokens)
    gc.collect()
    assert client.get("/healthz").json()["generations"] == 0  # none is left counted as running
    probs = torch.tensor([x["logprob"] for x in tokens[0]["top_tokens"]]).exp()
    assert 0 < float(probs.sum()) <= 1.0001 and tokens[0]["top_tokens"][0]["id"] == tokens[0]["token"]["id"]


def test_generate_stops_at_a_stop_string(client, shipped_models):
    lm = shipped_models.lm
    full = "".join(stream_text(lm.model, lm.tokenizer, "ROMEO:", 60, temperature=0))
    stop = full[20:23]
    r = client.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_tokens": 60, "temperature": 0, "stop": [stop]})
    assert r.json()["details"]["finish_reason"] == "stop"
    assert r.json()["generated_text"] == full[:full.index(stop)]


@pytest.mark.parametrize("body, says", [
    ({"prompt": "naïve ☃"}, "outside the model's vocabulary"),
    ({"max_new_tokens": 1001}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x" * 2001}, "limit"),
])
def test_bad_generation_requests(client, body, says):
    r = client.post("/v1/generate", json=body)
    assert 400 <= r.status_code < 500 and says in r.json()["error"], r.text


def test_explain(client, shipped_models):
    r = client.post("/v1/explain", json={"text": "A dog runs.", "layers": [2], "heads": [0, 3], "top_k": 3})
    assert r.status_code == 200, r.text
    j = r.json()
    cross = j["attention"]["cross"]
    assert j["output"] == "Ein Hund rennt."
    assert cross["rows"] == j["output_tokens"] and cross["cols"] == j["source_tokens"]
    w = torch.tensor(cross["weights"])  # [layer][head][target][source]
    assert w.shape == (1, 2, len(j["output_tokens"]), len(j["source_tokens"]))
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, w.size(2)), atol=1e-3)  # each row a distribution
    assert len(j["top_tokens"]) == len(j["output_tokens"]) and len(j["top_tokens"][0]) == 3
    r = client.post("/v1/explain", json={"text": "ROMEO:", "task": "lm", "max_new_tokens": 5})
    assert r.status_code == 200 and len(r.json()["attention"]["decoder"]["weights"]) == 6
    for body in ({"text": "a", "layers": [3]}, {"text": "a", "heads": [-1]}, {"text": "a", "task": "lm", "kinds": ["cross"]},
                 {"text": ""}, {"text": "a", "max_new_tokens": 512}):
        assert client.post("/v1/explain", json=body).status_code == 422, body


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["en-de", "shakespeare-char"]
    assert models["limits"]["max_texts"] == 8 and models["data"][0]["max_tokens_per_sentence"] == 511
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["batches"] >= 1 and health["batched_sentences"] >= health["batches"]
    assert "/v1/translate" in client.get("/openapi.json").json()["paths"]


def test_concurrent_requests_are_batched(live_server, live_app, shipped_models):
    before = live_app.state.server.batcher.batches
    sentences = SENTENCES * 4

    def one(s):
        return httpx.post(f"{live_server}/v1/translate", json={"text": s, "beam": 1}, timeout=60).json()["translation"]

    with ThreadPoolExecutor(len(sentences)) as pool:
        got = list(pool.map(one, sentences))
    assert got == offline(shipped_models, sentences, beam=1)
    assert live_app.state.server.batcher.batches - before < len(set(sentences)) * 2  # not one batch per request


def test_a_full_queue_is_503_and_a_slow_request_too(shipped_models):
    with TestClient(create_app(shipped_models, Limits(max_queue=2), warmup=False)) as c:
        r = c.post("/v1/translate", json={"texts": SENTENCES[:3]})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "busy" in r.json()["error"]
        assert c.post("/v1/translate", json={"texts": SENTENCES[:2]}).status_code == 200
    with TestClient(create_app(shipped_models, Limits(timeout_s=0.001), warmup=False)) as c:
        r = c.post("/v1/translate", json={"text": " ".join(SENTENCES)})
        assert r.status_code == 503 and "longer than" in r.json()["error"]


def test_cli_refuses_bad_options(capsys):
    from aiayn.cli import main

    for args, says in ((["--port", "70000"], "--port"), (["--model", "/no/such/model"], "no such model"),
                       (["--beam", "0"], "--beam")):
        assert main(["serve", *args]) != 0
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:  # (uvicorn's log said it, 8 lines in)
        port = taken.getsockname()[1]
        assert main(["serve", "--no-lm", "--port", str(port)]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"aiayn: error: cannot listen on 127.0.0.1:{port}: Address already in use"], err
    with pytest.raises(SystemExit) as e:  # argparse's choices, as for translate
        main(["serve", "--precision", "fp64"])
    assert e.value.code == 2 and "argument --precision: invalid choice: 'fp64'" in capsys.readouterr().err


def test_a_run_checkpoint_is_named_with_its_run(tmp_path):
    """`aiayn serve --model runs/tiny` serves the run's best checkpoint: its id names the run too."""
    from aiayn.serve.models import model_id

    assert model_id(tmp_path / "tiny" / "step-00000003") == "tiny/step-00000003"
    assert model_id(tmp_path / "en-de") == "en-de"
