"""Structured logs: one JSON object per line, the call id on every line of a call, no secrets."""

import asyncio
import io
import json
import logging

import pytest

from emostream.alerts import AlertRule
from emostream.client import SendOptions, send_file
from emostream.logs import JsonFormatter, call_context, configure, redact
from emostream.server import ServerConfig
from emostream.vad import VadConfig

from .live_util import ServerThread, write_call


@pytest.fixture
def captured_logs():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    configure("json", logging.INFO, stream=out)
    yield out
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def test_redact_scrubs_tokens_tickets_and_authorization():
    text = (
        "GET /v1/events?ticket=abc123&call_id=x /v1/pcm?token=s3cret Authorization: Bearer s3cret "
        'X-API-KEY: s3cret signature=:AbCd==: {"authorization": "Basic dXNlcg=="}'
    )
    out = redact(text)
    assert "s3cret" not in out and "abc123" not in out and "dXNlcg" not in out and "AbCd" not in out
    assert "call_id=x" in out and "ticket=***" in out


def test_json_lines_carry_the_call_id():
    record = logging.LogRecord("emostream.server", logging.INFO, __file__, 1, "hello %s", ("token=zzz",), None)
    with call_context("call-7"):
        logging.getLogger().handlers  # noqa: B018
        from emostream.logs import _ContextFilter

        _ContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["call_id"] == "call-7" and line["level"] == "INFO" and line["msg"] == "hello token=***"
    assert line["ts"].endswith("Z")
    with pytest.raises(ValueError):
        configure("xml")


def test_server_logs_are_json_with_call_ids_and_no_token(captured_logs, tmp_path):
    audio = write_call(tmp_path / "call.wav", 3.0)
    cfg = ServerConfig(
        port=0,
        token="sup3r-s3cret",
        analyse="all",
        vad=VadConfig.named("energy"),
        alerts=(AlertRule.parse("Neutral>=0.5"),),
    )
    with ServerThread(cfg) as srv:
        url = srv.url + "/?token=sup3r-s3cret"  # the token in the query string, as some bridges do
        result = asyncio.run(send_file(audio, url, SendOptions(fast=True, call_id="logged-call")))
        assert result.close_code == 1000
        bad = asyncio.run(send_file(audio, srv.url, SendOptions(fast=True, token="sup3r-s3cret", call_id="bad call!")))
        assert bad.close_code == 1007
    text = captured_logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert lines and all({"ts", "level", "logger", "call_id", "msg"} <= set(x) for x in lines)
    call_lines = [x for x in lines if x["call_id"] == "logged-call"]
    assert any("alert raised" in x["msg"] for x in call_lines)
    assert all(x["call_id"] == "logged-call" for x in lines if "logged-call" in x["msg"])
    assert "sup3r-s3cret" not in text
