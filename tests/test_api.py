"""ApiAgent against a scripted local OpenAI-compatible server (offline, 127.0.0.1 only).

Each test gives the server a list of behaviours, one per request received (the last one
repeats once the list is used up):
  "ok:<text>"   200 with a normal chat completion whose content is <text>
  "echo"        200, content = "reply to <sha1 of the system prompt>" (after a short sleep)
  "500" / "429" / "401"   that HTTP status with a small JSON error body
  "malformed"   200 with a body that is not JSON
  "nochoices"   200 with valid JSON lacking "choices"
  "sleep"       sleep (up to 2 s, cut short at teardown) before answering
"""
import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import domains
import runs
import negotiate  # noqa: E402

CFG_PATH = os.path.join(os.path.dirname(__file__), "..", "domains.yaml")


@pytest.fixture(scope="module")
def cfg():
    return domains.load_config(CFG_PATH)


@pytest.fixture(scope="module")
def scenarios(cfg):
    return domains.make_scenarios(cfg.domains["crad"])


@pytest.fixture
def ep(cfg, scenarios):
    return negotiate.new_episode(cfg.domains["crad"], scenarios[0], 0)


def _digest(text):
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class FakeServer:
    SLEEP_S = 2.0

    def __init__(self):
        self.script = ["ok:hello"]
        self.requests = []          # dicts: path, body (parsed JSON), auth
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.inflight = 0
        self.max_inflight = 0
        self.echo_delays = {}       # system-prompt digest -> seconds to sleep before answering
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code, payload, ctype="application/json"):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass    # the client gave up (timeout test)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with fake.lock:
                    idx = len(fake.requests)
                    fake.requests.append({"path": self.path, "body": body,
                                          "auth": self.headers.get("Authorization")})
                    beh = fake.script[min(idx, len(fake.script) - 1)]
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    self._behave(beh, body)
                finally:
                    with fake.lock:
                        fake.inflight -= 1

            def _behave(self, beh, body):
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                if beh.startswith("ok:"):
                    return self._send(200, _completion(beh[3:]))
                if beh == "echo":
                    d = _digest(body["messages"][0]["content"])
                    fake.stop.wait(fake.echo_delays.get(d, 0.0))
                    return self._send(200, _completion(f"reply to {d}"))
                if beh in ("500", "429", "401"):
                    return self._send(int(beh), json.dumps({"error": {"message": f"scripted {beh}"}}).encode())
                if beh == "malformed":
                    return self._send(200, b"{not json")
                if beh == "nochoices":
                    return self._send(200, b'{"object": "error"}')
                if beh == "sleep":
                    fake.stop.wait(FakeServer.SLEEP_S)
                    return self._send(200, _completion("too late"))
                raise AssertionError(f"unknown behaviour {beh!r}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.url = f"{self.base_url}/chat/completions"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def count(self):
        with self.lock:
            return len(self.requests)

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=2)


def _completion(text):
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}]}).encode()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def make_agent(cfg, server_or_url, **kw):
    base = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url
    args = dict(role="focal", base_url=base, api_key="k", timeout=0.5, retries=2, backoff=0.01)
    args.update(kw)
    return negotiate.ApiAgent("test-model", cfg, **args)


# ----------------------------------------------------------------------------------------

def test_normal_reply_and_request_shape(cfg, ep, server):
    server.script = ["ok:We could do 45 days if you pay today."]
    replies = make_agent(cfg, server).act([ep], ["anger"])
    assert len(replies) == 1
    r = replies[0]
    assert isinstance(r, negotiate.Reply)
    assert r.text == "We could do 45 days if you pay today."
    assert not r.accept and not r.walk_away
    assert server.count == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer k"
    body = req["body"]
    assert body["model"] == "test-model"
    msgs = body["messages"]
    assert msgs[0]["role"] == "system"
    assert "Emotional approach (anger)" in msgs[-1]["content"]
    assert msgs == negotiate.build_messages(cfg, ep, "focal", "anger")
    assert body["temperature"] == pytest.approx(0.7)
    assert body["top_p"] == pytest.approx(0.9)
    assert body["max_tokens"] == 96


def test_no_emotion_means_no_emotional_approach(cfg, ep, server):
    make_agent(cfg, server).act([ep])
    assert not any("Emotional approach" in m["content"] for m in server.requests[0]["body"]["messages"])


def test_trailing_slash_in_base_url(cfg, ep, server):
    make_agent(cfg, server.base_url + "/").act([ep], ["joy"])
    assert server.requests[0]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize("text,accept,walk", [
    ("I accept 30 days, we have a deal.", True, False),
    ("I'm done, I will walk away.", False, True),
])
def test_accept_and_walk_away_flags(cfg, ep, server, text, accept, walk):
    server.script = ["ok:" + text]
    (r,) = make_agent(cfg, server).act([ep], ["neutral"])
    assert r.text == text
    assert r.accept is accept
    assert r.walk_away is walk
    assert r.accept == negotiate.detect_accept(text)
    assert r.walk_away == negotiate.detect_walk_away(text)


@pytest.mark.parametrize("first", ["500", "429", "malformed", "nochoices"])
def test_retry_then_success(cfg, ep, server, first):
    server.script = [first, "ok:fine, 40 days"]
    (r,) = make_agent(cfg, server, retries=2).act([ep], ["anger"])
    assert r.text == "fine, 40 days"
    assert server.count == 2
    # the retry resends the same request
    assert server.requests[0]["body"] == server.requests[1]["body"]


def test_always_500_exhausts_retries(cfg, ep, server):
    server.script = ["500"]
    agent = make_agent(cfg, server, retries=2)
    with pytest.raises(negotiate.ApiError) as ei:
        agent.act([ep], ["anger"])
    msg = str(ei.value)
    assert "HTTP 500" in msg
    assert server.url in msg
    assert "3 attempt" in msg
    assert server.count == 3


@pytest.mark.parametrize("script,retries,words,attempts", [
    (["malformed"], 1, "malformed", 2),                          # always malformed: retries exhausted
    (["401", "ok:should never be reached"], 3, "HTTP 401", 1),   # 401 is not retried
])
def test_errors_after_the_right_number_of_attempts(cfg, ep, server, script, retries, words, attempts):
    server.script = script
    with pytest.raises(negotiate.ApiError) as ei:
        make_agent(cfg, server, retries=retries).act([ep], ["anger"])
    assert words in str(ei.value)
    assert f"{attempts} attempt" in str(ei.value)
    assert server.count == attempts


def test_timeout(cfg, ep, server):
    server.script = ["sleep"]
    agent = make_agent(cfg, server, timeout=0.3, retries=1)
    t0 = time.monotonic()
    with pytest.raises(negotiate.ApiError) as ei:
        agent.chat(negotiate.build_messages(cfg, ep, "focal", "anger"))
    elapsed = time.monotonic() - t0
    msg = str(ei.value).lower()
    assert "timeout" in msg or "timed out" in msg
    assert "2 attempt" in msg
    assert server.count == 2
    assert elapsed < 1.8, elapsed     # two 0.3 s timeouts, never the server's 2 s sleep


def test_batch_concurrent_and_in_order(cfg, scenarios, server):
    dom = cfg.domains["crad"]
    eps = [negotiate.new_episode(dom, scenarios[i], 0) for i in range(5)]
    emos = ["anger", "joy", "fear", "gratitude", "neutral"]
    systems = [negotiate.build_messages(cfg, e, "focal", emo)[0]["content"] for e, emo in zip(eps, emos)]
    assert len(set(systems)) == 5
    # later episodes answer sooner, so completion order is the reverse of request order
    server.echo_delays = {_digest(s): 0.05 * (5 - i) for i, s in enumerate(systems)}
    server.script = ["echo"]
    replies = make_agent(cfg, server, workers=8).act(eps, emos)
    assert [r.text for r in replies] == [f"reply to {_digest(s)}" for s in systems]
    assert server.count == 5
    assert sorted(_digest(r["body"]["messages"][0]["content"]) for r in server.requests) == \
        sorted(_digest(s) for s in systems)
    assert server.max_inflight >= 2, "requests were not sent concurrently"


def test_unreachable_server(cfg, ep):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    agent = make_agent(cfg, f"http://127.0.0.1:{port}/v1", retries=1)
    with pytest.raises(negotiate.ApiError) as ei:
        agent.act([ep], ["anger"])
    assert f"127.0.0.1:{port}" in str(ei.value)
    assert "2 attempt" in str(ei.value)


def test_parse_score():
    assert negotiate.parse_score("SCORE: 7") == 7.0
    assert negotiate.parse_score("The turn is firm.\nscore = 8.5") == 8.5
    assert negotiate.parse_score("SCORE: 42") == 10.0 and negotiate.parse_score("SCORE: 0") == 1.0
    assert negotiate.parse_score("I would give it a seven.") is None
    assert negotiate.parse_score("SCORE: 204 days to pay it all back.") is None
    assert negotiate.parse_score("SCORE: 10:30 PM") is None
    assert negotiate.parse_score("SCORE: 7 because the offer is firm.") == 7.0
    assert negotiate.parse_score("") is None and negotiate.parse_score(None) is None


def test_judge_messages_mark_the_turn(cfg):
    dom = cfg.domains["hospital"]
    ep = negotiate.new_episode(dom, domains.make_scenarios(dom)[0], 0)
    negotiate.run_episodes(cfg, [ep], negotiate.SimTeacher(cfg), negotiate.SimCounterparty(cfg),
                           negotiate.random_emotion_policy())
    rec = negotiate.to_record(ep)
    msgs = negotiate.judge_messages(rec, 2, cfg)
    assert "SCORE" in msgs[0]["content"] and rec["turns"][2]["emotion"] in msgs[0]["content"]
    assert "as high as possible" in msgs[0]["content"]          # hospital: the scheduler wants more days
    marked = [ln for ln in msgs[1]["content"].splitlines() if ln.startswith(">>> ")]
    assert marked == [f">>> {dom.focal_role}: {rec['turns'][2]['text']}"]
    assert rec["turns"][3]["text"] in msgs[1]["content"]          # the reply it provoked is shown
    assert len(rec["turns"]) < 5 or rec["turns"][4]["text"] not in msgs[1]["content"]


@pytest.mark.parametrize("answer,want", [("SCORE: 7", 7.0), ("It seems fine to me.", None)])
def test_api_judge_stage(tmp_path, monkeypatch, server, answer, want):
    import emodistill
    monkeypatch.setenv("EMODISTILL_API_BASE", server.base_url)
    server.script = [f"ok:{answer}"]
    out = str(tmp_path / "run")
    assert emodistill.main(["collect", "--out", out, "--domains", "crad", "--scenarios", "0-2",
                            "--seeds-per-scenario", "1"]) == 0
    assert emodistill.main(["judge", "--out", out, "--judge", "api:judge-model"]) == 0
    recs, _ = runs.read_jsonl(os.path.join(out, "judged.jsonl"))
    focal = [t for r in recs for t in r["turns"] if t["speaker"] == "focal"]
    assert server.count == len(focal) and all(t["score"] == want for t in focal)
    assert all(set(t["components"]) >= {"offer", "effect"} for t in focal)   # rubric parts kept
    assert server.requests[0]["body"]["model"] == "judge-model"
    assert emodistill.main(["iql", "--out", out, "--steps", "20"]) == 0       # missing scores are usable


def test_study_counterparties_with_api_counterparty(tmp_path, monkeypatch, server):
    """The unseen-counterparty study: training personas, the held-out persona and an api:
    counterparty (the local mock server) in one table, all from teacher-random episodes."""
    import emodistill
    monkeypatch.setenv("EMODISTILL_API_BASE", server.base_url)
    server.script = ["ok:I can pay it all back in 40 days."]
    out = str(tmp_path / "run")
    assert emodistill.main(["eval", "--out", out, "--domains", "crad", "--methods", "teacher-random,teacher-fixed:joy",
                            "--seeds", "1"]) == 0
    assert emodistill.main(["study-counterparties", "--out", out, "--domains", "crad", "--methods", "teacher-random",
                            "--seeds", "1", "--counterparties", "api:cp-model"]) == 0
    assert server.count > 0 and server.requests[0]["body"]["model"] == "cp-model"
    res = json.load(open(os.path.join(out, "eval-cp-api_cp-model", "teacher-random.json")))
    cp_turns = [t for r in res["records"] for t in r["turns"] if t["speaker"] == "counterparty"]
    assert cp_turns and all(t["text"] == "I can pay it all back in 40 days." and t["offer"] == 40 for t in cp_turns)
    held = json.load(open(os.path.join(out, "eval-heldout", "teacher-random.json")))
    assert {r["persona"] for r in held["records"]} == {"guarded"}
    md = open(os.path.join(out, "results.md")).read()
    row = next(ln for ln in md.splitlines() if ln.startswith("| teacher-random |") and "<br>" in ln)
    assert row.count("<br>") == 3          # three counterparty settings
    assert "api:cp-model counterparty" in md
    assert "| teacher-fixed:joy |" in md  # the study did not rewrite the main eval's table with its own methods
