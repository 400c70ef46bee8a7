"""glmport serve end to end: a tiny model fine-tuned here (two LoRA adapters on one base), served by
`python -m glmport serve` on a free loopback port, and talked to the way users do: the real `openai` client,
raw HTTP for what a client library would not send, a flood of concurrent clients, a client that hangs up,
a real browser on the chat page, and the same server on emulated MLU with the 64-bit guard on.

Every test here shares one xdist group: the adapters are trained once, on one worker.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_cli import write_config

from glmport.testing import ok, run_cli
from glmport.tiny.synthetic import write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve")]
openai = pytest.importorskip("openai", reason="the test extra installs openai: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-0123456789"
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
HELLO = "Hello from the tuned model."
BONJOUR = "Bonjour from the other one."
WEATHER_REPLY = "It is 21 degrees."
# the untrained base never stops on this (a test checks it): a long reply that holds the generation slot
HOG = [{"role": "user", "content": "Write a very long poem about the sea"}]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# --- the models: two adapters of one tiny base, trained here ------------------------------------------------

def _tool_records() -> list[dict]:
    """ChatGLM3 conversations: a weather tool call and its answer, and a greeting. The tools are the bare
    function, as ChatGLM3 declares them and as the server renders an OpenAI `tools` list for this family."""
    weather = {"tools": [WEATHER["function"]], "conversations": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "tool", "name": "weather", "parameters": {"city": "Paris"}, "observation": "21"},
        {"role": "assistant", "content": WEATHER_REPLY}]}
    hello = {"conversations": [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": HELLO}]}
    return [weather, weather, weather, hello] * 2


def _train(folder: Path, base: Path, records: list[dict], steps: int) -> Path:
    write_jsonl(folder / "data" / "train.jsonl", records)
    config = write_config(
        folder, "lora", data_config={"train_file": "train.jsonl"}, max_input_length=384, max_output_length=64,
        training_args__max_steps=steps, training_args__learning_rate=1e-2, training_args__lr_scheduler_type="constant",
        training_args__save_strategy="no", training_args__eval_strategy="no", training_args__logging_steps=20,
        training_args__predict_with_generate=False,
        # the LM head trained too (peft's modules_to_save, one copy per adapter): a tiny model learns its
        # replies in a few dozen steps that way, and adapters that replace the head test switching for real
        peft_config={"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0,
                     "modules_to_save": ["lm_head"]},
        glmport={"dtype": "fp32", "plot": False})
    ok(run_cli("train", folder / "data", base, config, "-q", in_process=False))
    return folder / "out" / "final"


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-adapters")
    base = models["native"]
    hello = {"conversations": [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": BONJOUR}]}
    return {"base": base, "tuned": _train(root / "tuned", base, _tool_records(), 60),
            "other": _train(root / "other", base, [hello] * 4, 30)}


# --- a server in a subprocess ------------------------------------------------------------------------------

class Server:
    """`python -m glmport serve ... --port 0`, its output in a file, its address read from it."""

    def __init__(self, log: Path, *args, env: dict | None = None):
        self.log = log
        command = [sys.executable, "-m", "glmport", "serve", *map(str, args), "--port", "0"]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                            env={**os.environ, "GLMPORT_API_KEY": "", **(env or {})})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            found = re.search(r"glmport serve: http://127\.0\.0\.1:(\d+)", self.output())
            if found:
                self.port = int(found.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
                return
            if self.process.poll() is not None:
                pytest.fail(f"glmport serve exited {self.process.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        self.process.kill()
        pytest.fail(f"glmport serve did not start in time:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, key: str | None = KEY, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120, **options)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def post(self, payload, key: str | None = KEY, **kwargs) -> tuple[int, dict]:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        status, _, body = self.request("POST", "/v1/chat/completions", raw, headers, **kwargs)
        return status, json.loads(body) if body else {}

    def health(self) -> dict:
        return json.loads(self.request("GET", "/health")[2])

    def wait_idle(self, within: float) -> float:
        """Seconds until nothing runs or waits; fails past ``within``."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            queue = self.health()["queue"]
            if not queue["running"] and not queue["waiting"]:
                return time.monotonic() - started
            time.sleep(0.05)
        pytest.fail(f"the server still works on something after {within} s: {self.health()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    served = Server(log, adapters["tuned"], "--name", "tuned", "--adapter", f"other={adapters['other']}",
                    "--max-queue", "2", "--queue-timeout", "0.5", "--max-body-bytes", "65536", "--max-tokens", "900",
                    "--max-concurrent", "14", "--backend", "cpu", env={"GLMPORT_API_KEY": KEY})
    yield served
    status = served.stop()
    output = served.output()
    assert status == 130, output[-3000:]  # stopped by SIGTERM, as every interrupted glmport command
    assert "Traceback" not in output, output[-6000:]


def chat(client, model="tuned", text="Say hello", **options):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **options)


# --- the openai client ---------------------------------------------------------------------------------------

def test_models_and_health(server):
    listed = {m.id: m for m in server.client().models.list().data}
    assert set(listed) == {"native", "tuned", "other"}  # the base, the result, the extra adapter
    assert getattr(listed["tuned"], "parent", None) == "native" and getattr(listed["other"], "parent", None) == "native"
    health = server.health()
    assert health["status"] == "ok" and health["backend"] == "cpu" and health["api_key"] is True


def test_plain_and_streamed_replies_agree(server, adapters):
    from transformers import AutoTokenizer

    from glmport.data.records import Message
    from glmport.data.templates import get_template

    template = get_template("auto", AutoTokenizer.from_pretrained(adapters["base"]))
    prompt = len(template.prompt_ids([Message("user", "Say hello")]))
    reply_tokens = len(template.tokenizer.encode("\n" + HELLO, add_special_tokens=False)) + 1  # and the stop token

    client = server.client()
    reply = chat(client)
    assert reply.choices[0].message.content == HELLO and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.tool_calls is None and reply.model == "tuned" and reply.object == "chat.completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (prompt, reply_tokens, prompt + reply_tokens)

    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == HELLO  # streamed piece by piece, adding up to the same reply
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply_tokens

    cut = chat(client, max_tokens=5)  # "\n" and four characters
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason, cut.usage.completion_tokens) == \
        ("Hell", "length", 5)
    stopped = chat(client, stop=["tuned"])  # the reply up to the stop sequence, as it is (OpenAI's rule)
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("Hello from the ", "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stop=["tuned"], stream=True) if c.choices)
    assert streamed == "Hello from the "

    sampled = [chat(client, model="native", temperature=1.5, seed=seed, max_tokens=12).choices[0].message.content
               for seed in (7, 7)]
    assert sampled[0] == sampled[1]  # a seed reproduces a sampled reply


def test_a_tool_call_round_trip(server):
    client = server.client()
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="tuned", messages=asked, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model="tuned", messages=asked, tools=[WEATHER], stream=True))
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # a call is not streamed as text
    (streamed_call,) = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert streamed_call.function.name == "weather" and json.loads(streamed_call.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    answered = asked + [choice.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "21"}]
    final = client.chat.completions.create(model="tuned", messages=answered, tools=[WEATHER])
    assert final.choices[0].message.content == WEATHER_REPLY and final.choices[0].finish_reason == "stop"


def test_each_request_gets_the_adapter_it_names(server):
    client = server.client()
    replies = [chat(client, model=name).choices[0].message.content for name in ("tuned", "other", "tuned", "native",
                                                                                 "other")]
    assert replies[0] == replies[2] == HELLO and replies[1] == replies[4] == BONJOUR
    assert replies[3] not in (HELLO, BONJOUR)  # the base, with the adapters off


def test_errors_in_openais_shape(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, model="gpt-4o")
    assert caught.value.code == "model_not_found" and "tuned" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, text="x" * 1100)
    assert caught.value.code == "context_length_exceeded" and "maximum context length is 1024" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, text="Say hello" * 20, max_tokens=900)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tuned", messages=[{"role": "robot", "content": "beep"}])
    assert "messages[0].role" in caught.value.message and caught.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, n=2)
    assert "n: 2" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, max_tokens=901)
    assert "--max-tokens" in caught.value.message


def test_the_api_key_is_required_and_checked(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        chat(server.client(key="wrong-key"))
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    status, body = server.post({"model": "tuned", "messages": [{"role": "user", "content": "Say hello"}]}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _, _ = server.request("GET", "/v1/models")
    assert status == 401
    assert server.request("GET", "/")[0] == 200 and server.request("GET", "/health")[0] == 200  # nothing secret there


# --- bad input and load ---------------------------------------------------------------------------------------

def test_malformed_hostile_and_oversized_requests_are_answered_and_the_server_goes_on(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for raw, says in ((b'{"model": "tuned", "messages": [', "not valid JSON"),
                      (b"[" * 3000 + b"]" * 3000, "nested too deeply"),
                      (b"\xff" * 10, "not UTF-8"),
                      (b'"just a string"', "send a JSON object"),
                      (json.dumps({"model": "tuned", "messages": [{"role": "user", "content": ["x"]}]}).encode(),
                       "messages[0].content[0]: expected an object"),
                      (json.dumps({"model": "tuned", "messages": {"role": "user"}}).encode(), "messages: expected an array"),
                      (json.dumps({"model": "tuned", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": "lots"}).encode(), "max_tokens: expected an integer")):
        status, body = server.post(raw)
        assert status == 400 and says in body["error"]["message"], (raw[:60], body)

    status, _, body = server.request("POST", "/v1/chat/completions", b"model=tuned", {**auth})
    assert status == 415 and b"application/json" in body

    big = json.dumps({"model": "tuned", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    status, body = server.post(big)
    assert status == 413 and body["error"]["code"] == "request_too_large"

    # a declared length over the bound is refused before a byte of the body is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw_socket:
        raw_socket.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n")
        assert raw_socket.recv(65536).startswith(b"HTTP/1.1 413")

    # a chunked body that grows past the bound is cut off as it arrives
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in {**auth, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}.items():
        connection.putheader(name, value)
    connection.endheaders()
    try:
        for _ in range(40):
            connection.send(b"1000\r\n" + b" " * 4096 + b"\r\n")
        connection.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may close the connection while we are still sending
    assert connection.getresponse().status == 413
    connection.close()

    assert server.request("DELETE", "/v1/chat/completions", headers=auth)[0] == 405
    status, _, body = server.request("GET", "/v2/anything", headers=auth)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"

    assert chat(server.client()).choices[0].message.content == HELLO  # still serving
    assert "Traceback" not in server.output()


def test_the_untrained_base_runs_the_hog_to_its_length(server):
    """The flood and hang-up tests need the hog to hold the slot: the base must not stop on its own."""
    reply = server.client().chat.completions.create(model="native", messages=HOG, max_tokens=300)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 300


def _hog(server) -> http.client.HTTPResponse:
    """A long streamed reply from the untrained base (900 tokens: it never stops on this prompt), holding the
    generation slot; returned once the first event has arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions",
                       json.dumps({"model": "native", "messages": HOG, "max_tokens": 900, "stream": True}),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return response


def test_a_flood_beyond_the_queue_gets_429_and_503_and_a_disconnect_frees_the_slot(server):
    hog = _hog(server)
    assert server.health()["queue"]["running"]
    payload = {"model": "tuned", "messages": [{"role": "user", "content": "Say hello"}]}
    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: server.post(payload), range(12)))
    took = time.monotonic() - started
    statuses = sorted(status for status, _ in answers)
    # one generating (the hog), two may wait (--max-queue 2) and give up after --queue-timeout 0.5: 503; the rest 429
    assert statuses == [429] * 10 + [503] * 2, answers
    assert {body["error"]["code"] for status, body in answers} == {"queue_full", "queue_timeout"}
    assert took < 15, took  # nobody waited on the hog
    assert server.health()["queue"]["running"]

    hog.close()  # the client hangs up mid-stream: its generation is cancelled
    assert server.wait_idle(within=5) < 5
    started = time.monotonic()
    assert chat(server.client()).choices[0].message.content == HELLO
    assert time.monotonic() - started < 10


def test_a_client_that_hangs_up_on_a_plain_request_frees_the_slot(server):
    payload = json.dumps({"model": "native", "messages": HOG, "max_tokens": 900}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw_socket:
        raw_socket.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                           + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        deadline = time.monotonic() + 10
        while not server.health()["queue"]["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert server.wait_idle(within=5) < 5


def test_requests_in_progress_are_bounded(server):
    """14 clients that send headers and then nothing hold 14 requests (--max-concurrent 14): the next is
    refused at once; when they go, the server serves again."""
    stalled = []
    try:
        for _ in range(14):
            stalled_socket = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            stalled_socket.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                   b"application/json\r\nAuthorization: Bearer " + KEY.encode()
                                   + b"\r\nContent-Length: 100\r\n\r\n{")
            stalled.append(stalled_socket)
        deadline = time.monotonic() + 10
        while True:
            status, headers, body = server.request("GET", "/health")
            if status == 503:
                break
            assert time.monotonic() < deadline, "the 15th request was not refused"
            time.sleep(0.1)
        assert json.loads(body)["error"]["code"] == "server_busy" and headers.get("retry-after") == "1"
    finally:
        for stalled_socket in stalled:
            stalled_socket.close()
    deadline = time.monotonic() + 10
    while server.request("GET", "/health")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert chat(server.client()).choices[0].message.content == HELLO


# --- the page in a real browser ---------------------------------------------------------------------------------

def test_the_chat_page_streams_a_reply_in_a_browser(server, tmp_path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"no headless browser: {CHROMIUM} and {CHROMEDRIVER} come with Debian's chromium and "
                    "chromium-driver packages (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the test extra installs selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as arrive
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,800",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.url + "/")
        wait.until(arrive.visibility_of_element_located((By.ID, "key")))  # the server wants a key: the page asks
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "use-key").click()
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 3)
        Select(browser.find_element(By.ID, "model")).select_by_value("tuned")
        # count how often the reply's text changes while it arrives
        browser.execute_script("""
            window.updates = 0;
            new MutationObserver(() => { window.updates += 1; })
                .observe(document.getElementById('messages'), {subtree: true, characterData: true, childList: true});""")
        browser.find_element(By.ID, "input").send_keys("Say hello")
        browser.find_element(By.ID, "send").click()
        bubble = wait.until(arrive.presence_of_element_located((By.CSS_SELECTOR, ".message.assistant[data-done='true']")))
        assert bubble.text == HELLO and bubble.get_attribute("data-finish") == "stop"
        assert browser.execute_script("return window.updates") > 5  # streamed in pieces, not in one go
        artifacts = Path(os.environ.get("GLMPORT_TEST_ARTIFACTS", REPO / "output" / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / "serve-chat-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        print(f"screenshot: {shot}")

        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    finally:
        browser.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# --- emulated MLU ---------------------------------------------------------------------------------------------------

def test_the_same_server_on_emulated_mlu_with_the_guard_on(adapters, tmp_path):
    served = Server(tmp_path / "mlu.log", adapters["tuned"], "--name", "tuned", "--adapter",
                    f"other={adapters['other']}", "--max-tokens", "64", env={"GLMPORT_EMULATE": "mlu"})
    try:
        assert served.health()["backend"] == "mlu"
        assert "on mlu (guard error)" in served.output()
        client = served.client(key=None)
        assert chat(client).choices[0].message.content == HELLO
        assert chat(client, model="other").choices[0].message.content == BONJOUR
        assert "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True) if c.choices) == HELLO
        reply = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                               tools=[WEATHER])
        assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
        # without an API key only loopback names are served (no DNS rebinding)
        status, _, body = served.request("GET", "/health", headers={"Host": "attacker.example:80"})
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_host"
    finally:
        assert served.stop() == 130
    output = served.output()
    assert "Traceback" not in output and "64-bit" not in output, output[-4000:]
