"""P²O's prompt half: set cover and assignment by hand, the reflection backends (teacher on loopback), the adapter."""

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from p2o_lightning.prompt.assignment import assign_templates, set_cover
from p2o_lightning.prompt.reflection import OfflineProposer, ReflectionError, TeacherReflection


# ------------------------------------------------------------------------------------------------ set cover
def test_set_cover_by_hand():
    # template 0 solves {a, b}, 1 solves {b, c, d}, 2 solves {d}, 3 solves {e}
    solved = [{"a", "b"}, {"b", "c", "d"}, {"d"}, {"e"}]
    scores = [0.4, 0.6, 0.2, 0.2]
    # pick 1 (3 new: b c d), then 0 (1 new: a) ties with 3 (1 new: e) -> 0 has the higher score, then 3
    assert set_cover(solved, scores) == [1, 0, 3]
    assert set_cover([set(), set()], [0.0, 0.0]) == []
    with pytest.raises(ValueError):
        set_cover([{"a"}], [0.1, 0.2])


def test_assignment_draws_from_solvers_with_replacement():
    templates = ["", "Add the digits.", "Go column by column.", "Useless words."]
    dev_scores = [
        {"p1": 0.0, "p2": 0.0, "p3": 0.0},  # the seed: never counts as help
        {"p1": 1.0, "p2": 0.0, "p3": 0.0},  # solves p1
        {"p1": 0.0, "p2": 1.0, "p3": 1.0},  # solves p2, p3
        {"p1": 0.0, "p2": 0.0, "p3": 0.0},  # solves nothing: not in the cover
    ]
    hard = ["p1", "p2", "p3", "q_train"]
    out = assign_templates(hard, templates, dev_scores, k=6, rng=random.Random(0))
    assert set(out) == set(hard) and all(len(v) == 6 for v in out.values())
    assert set(out["p1"]) == {"Add the digits."}  # solved problems draw only from their solvers
    assert set(out["p2"]) == set(out["p3"]) == {"Go column by column."}
    # a train problem draws from the whole cover, weighted by mean dev score (1/3 vs 2/3)
    many = assign_templates(["q"], templates, dev_scores, k=3000, rng=random.Random(1))["q"]
    assert set(many) == {"Add the digits.", "Go column by column."}
    assert many.count("Go column by column.") / 3000 == pytest.approx(2 / 3, abs=0.03)
    # without group diversity all K rollouts of a prompt share one template
    same = assign_templates(hard, templates, dev_scores, k=6, rng=random.Random(0), group_diversity=False)
    assert all(len(set(v)) == 1 for v in same.values())
    # nothing solved anything: no assignment
    assert (
        assign_templates(hard, templates[:1] + templates[3:], [dev_scores[0], dev_scores[3]], 6, random.Random()) == {}
    )
    # the seed template joins the cover when it solves a dev problem no other template does (as the reference);
    # then the problem it solves draws only the seed, i.e. plain rollouts
    seed_solves = [{"p1": 0.0, "p2": 0.0, "p3": 1.0}, *dev_scores[1:]]
    seed_solves[2] = {"p1": 0.0, "p2": 1.0, "p3": 0.0}
    out = assign_templates(hard, templates, seed_solves, k=6, rng=random.Random(0))
    assert out["p3"] == [""] * 6 and set(out["p2"]) == {"Go column by column."}
    assert "" in set(assign_templates(["q"], templates, seed_solves, k=300, rng=random.Random(2))["q"])
    # a cover of the seed alone: nothing to distil
    assert assign_templates(hard, templates[:1], seed_solves[:1], 6, random.Random()) == {}


# ------------------------------------------------------------------------------------------------ offline proposer
def test_offline_proposer_mutates_within_vocabulary():
    proposer = OfflineProposer(vocabulary=["add", "the", "digits", "carry"], max_words=4, seed=0)
    records = {"template": [{"Inputs": "12+3=", "Generated Outputs": "14", "Feedback": "wrong", "Score": 0.0}]}
    seen = set()
    text = ""
    for _ in range(50):
        text = proposer({"template": text}, records, ["template"])["template"]
        words = text.rstrip(".").lower().split()
        assert 1 <= len(words) <= 4 and set(words) <= {"add", "the", "digits", "carry"}
        assert text[0].isupper() and text.endswith(".")
        seen.add(text)
    assert len(seen) > 10  # it explores
    state = proposer.state_dict()
    a = proposer.mutate("Add the digits.", 2)
    proposer.load_state_dict(state)
    assert proposer.mutate("Add the digits.", 2) == a  # checkpointable RNG


# ------------------------------------------------------------------------------------------------ teacher on loopback
class _ChatHandler(BaseHTTPRequestHandler):
    mode = "ok"
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body, self.headers.get("Authorization")))
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "garbage":
            payload = b"<html>not json</html>"
        elif self.mode == "no_choices":
            payload = json.dumps({"error": "overloaded"}).encode()
        elif self.mode == "500":
            self.send_response(500)
            self.end_headers()
            return
        else:
            reply = "```\nAdd the digits column by column.\n```"
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ChatHandler.requests = []
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_teacher_speaks_chat_completions(chat_server, monkeypatch):
    _, url = chat_server
    monkeypatch.setenv("TEST_KEY", "sk-test")
    _ChatHandler.mode = "ok"
    teacher = TeacherReflection(url, model="kimi", api_key_env="TEST_KEY", timeout=5, max_retries=0)
    teacher.check()
    assert "column by column" in teacher("Write a better instruction.")
    path, body, auth = _ChatHandler.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "kimi" and auth == "Bearer sk-test"
    assert body["messages"] == [{"role": "user", "content": "Write a better instruction."}]


@pytest.mark.parametrize(("mode", "message"), [("garbage", "answered garbage"), ("no_choices", "answered garbage")])
def test_teacher_garbage_is_a_clear_error(chat_server, mode, message):
    _, url = chat_server
    _ChatHandler.mode = mode
    with pytest.raises(ReflectionError, match=message):
        TeacherReflection(url, model="m", timeout=5, max_retries=0)("hi")


def test_teacher_slow_and_5xx_retry_then_fail_naming_the_url(chat_server):
    _, url = chat_server
    _ChatHandler.mode = "slow"
    with pytest.raises(ReflectionError, match=r"127\.0\.0\.1.*unreachable after 2 attempts"):
        TeacherReflection(url, model="m", timeout=0.2, max_retries=1)("hi")
    _ChatHandler.mode = "500"
    with pytest.raises(ReflectionError, match="HTTP 500"):
        TeacherReflection(url, model="m", timeout=5, max_retries=1)("hi")
    assert len(_ChatHandler.requests) >= 4  # 2 slow attempts + 2 failing ones


def test_teacher_down_names_the_url():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = TeacherReflection(f"http://127.0.0.1:{port}/v1", model="m", timeout=1, max_retries=0)
    with pytest.raises(ReflectionError, match=f"http://127.0.0.1:{port}/v1/chat/completions is unreachable"):
        teacher.check()
    with pytest.raises(ValueError, match="base_url"):
        TeacherReflection("localhost:8000", model="m")
