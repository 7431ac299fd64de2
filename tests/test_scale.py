"""Ray on this machine (one local instance for the module, started by the test with ray.init()):
the Serve deployment behind the websocket front end gives the in-process server's events for
concurrent calls; serve --ray auto joins that instance; batch --ray (Ray Data) writes what the local
batch writes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'emostream[scale]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'emostream[scale]')")
pq = pytest.importorskip("pyarrow.parquet", reason="batch writes Parquet with pyarrow (emostream[scale])")

from emostream.client import SendOptions, send_file  # noqa: E402
from emostream.server import ServerConfig  # noqa: E402
from emostream.vad import VadConfig  # noqa: E402
from emostream.worker import ModelSpec, WorkerConfig  # noqa: E402

from .conftest import EXAMPLES, ROOT  # noqa: E402
from .live_util import ServerThread  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    """One small local Ray instance for the whole module (2 CPUs, no dashboard), shut down at the end."""
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        logging_level="WARNING",
    )
    serve.start(proxy_location="Disabled")
    yield ray
    serve.shutdown()
    ray.shutdown()


def call_files(tmp_path, n=3, seconds=6):
    """``n`` short stereo calls cut from the example (different stretches, so different events)."""
    audio, rate = sf.read(EXAMPLES / "call_stereo.flac")
    paths = []
    for k in range(n):
        start = (10 + 25 * k) * rate
        paths.append(tmp_path / f"call{k}.flac")
        sf.write(paths[-1], audio[start : start + seconds * rate], rate)
    return paths


async def send_all(url, paths):
    """The calls at once, each over its own /v1/pcm websocket."""
    options = [SendOptions(protocol="pcm", fast=True, call_id=p.stem) for p in paths]
    return await asyncio.gather(*[send_file(p, url, o) for p, o in zip(paths, options)])


def events_by_call(results):
    return {r.call_id: r.events for r in results}


def assert_same_events(got, want):
    assert got.keys() == want.keys()
    for call_id in want:
        a, b = got[call_id], want[call_id]
        assert [(e["channel"], e["t_start"], e["t_end"], e["speech"]) for e in a] == [
            (e["channel"], e["t_start"], e["t_end"], e["speech"]) for e in b
        ]
        for x, y in zip(a, b):
            if y["speech"]:
                diff = max(abs(x["probabilities"][c] - y["probabilities"][c]) for c in y["probabilities"])
                assert diff <= 2e-3, (call_id, x, y)  # batch composition differs: rounding-level only
                top = sorted(y["probabilities"].values())[-2:]
                assert x["label"] == y["label"] or top[1] - top[0] < 4e-3


def test_serve_deployment_answers_concurrent_calls_like_the_in_process_server(
    ray_session, tmp_path, shipped_checkpoint, predictor
):
    from emostream.scale import RayWorker, ServeConfig, deploy

    paths = call_files(tmp_path)
    config = ServerConfig(
        port=0, analyse="all", vad=VadConfig.named("silero"), worker=WorkerConfig(max_batch=8, max_wait_ms=20)
    )
    with ServerThread(config, predict=predictor.predict) as srv:
        srv.call(srv.server.wait_ready(60))
        local = asyncio.run(send_all(srv.url, paths))
    spec = ModelSpec(device="cpu", threads=1, backend="torch")  # the local server's model
    # a long batch wait, so that concurrent requests are batched even on a loaded machine
    handle, info, deployed = deploy(spec, ServeConfig(app_name="emostream-test", cpus=1, max_batch=8, max_wait_ms=200))
    try:
        assert deployed and info["device"] == "cpu" and info["name"] == "emostream-resnet50"
        worker = RayWorker(handle, config.worker)
        with ServerThread(config, worker=worker) as srv:
            srv.call(srv.server.wait_ready(60))  # the warm-up request is answered (and counted) first
            remote = asyncio.run(send_all(srv.url, paths))
            metrics = srv.server.metrics.render().decode()
            status = srv.server.status()
        assert all(r.close_code == 1000 and r.summary is not None for r in remote)
        assert_same_events(events_by_call(remote), events_by_call(local))
        for a, b in zip(remote, local):
            assert a.summary["channels"].keys() == b.summary["channels"].keys() == {"agent", "customer"}
        # the replicas' model calls reach the front end's metrics: windows per model call
        windows = sum(1 for r in remote for e in r.events if e["speech"]) + 1  # + the warm-up request
        assert status["worker"]["windows"] == windows, status
        count = re.search(r"^emostream_inference_batch_size_count (\S+)$", metrics, re.M)
        assert float(count.group(1)) == status["worker"]["batches"], (count.group(0), status)
        # requests of different calls that wait together go into one model call
        batching = RayWorker(handle, WorkerConfig(max_batch=8))

        async def eight_calls():
            await batching.start()
            window = np.zeros((1, 96000), np.float32)
            return await asyncio.gather(*[batching.infer(window) for _ in range(8)])

        answers = asyncio.run(eight_calls())
        assert [a.shape for a in answers] == [(1, 7)] * 8
        assert batching.stats.windows == 8 and batching.stats.largest_batch > 1, batching.stats
        # reusing the running application (a second front end) does not redeploy it
        again, _, redeployed = deploy(spec, ServeConfig(app_name="emostream-test"))
        assert not redeployed
    finally:
        serve.delete("emostream-test")


def test_serve_cli_joins_the_running_ray_instance(ray_session, tmp_path):
    """emostream serve --ray auto as its own process: the same websocket API and auth; /metrics names
    the deployment's model. (--no-model keeps it quick: the replica answers a fixed Neutral.)"""
    path = call_files(tmp_path, n=1, seconds=4)[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emostream",
            "serve",
            "--ray",
            "auto",
            "--port",
            "0",
            "--token",
            "t0k",
            "--no-model",
            "--analyse",
            "all",
            "--vad",
            "energy",
            "--ray-cpus",
            "0.5",
            "--ray-app",
            "emostream-cli",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port, lines = None, []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)[-3000:]
        assert any("deployed Ray Serve application 'emostream-cli'" in x for x in lines)
        result = asyncio.run(
            send_file(path, f"ws://127.0.0.1:{port}", SendOptions(protocol="pcm", fast=True, token="t0k"))
        )
        assert result.close_code == 1000 and result.summary is not None
        assert {e["label"] for e in result.events if e["speech"]} == {"Neutral"}
        with pytest.raises(Exception):  # same auth: no token, no call
            asyncio.run(send_file(path, f"ws://127.0.0.1:{port}", SendOptions(protocol="pcm", fast=True)))
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer t0k"})
        metrics = urllib.request.urlopen(request, timeout=10).read().decode()
        assert 'model_name="none"' in metrics and "emostream_inference_batch_size_count" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        serve.delete("emostream-cli")
    assert proc.returncode == 0
    assert "emostream-cli" not in serve.status().applications


def test_batch_on_ray_data_writes_what_the_local_batch_writes(ray_session, tmp_path, shipped_checkpoint, capsys):
    from emostream.cli import main

    from .test_batch import make_folder

    archive = make_folder(tmp_path / "calls", seconds=6)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert (
        main(["batch", str(archive), "--out", str(local), "--vad", "energy", "--alert", "Sad>=0.3 for 2s", "--quiet"])
        == 2
    )
    capsys.readouterr()
    # ray is initialised in this process: --ray uses it (a separate process would say --ray auto)
    assert (
        main(
            [
                "batch",
                str(archive),
                "--out",
                str(on_ray),
                "--ray",
                "auto",
                "--workers",
                "2",
                "--ray-cpus",
                "0.5",
                "--vad",
                "energy",
                "--alert",
                "Sad>=0.3 for 2s",
                "--quiet",
            ]
        )
        == 2
    )
    out = capsys.readouterr()
    assert "5 call(s): 2 analysed" in out.out and "3 failed" in out.out
    assert {line.split(":")[2].strip() for line in out.err.splitlines() if line.startswith("emostream: error")} == {
        "corrupt",
        "empty",
        "silent",
    }
    for name in ("stereo.jsonl", "2024-05__mono.jsonl"):
        assert (on_ray / name).read_text() == (local / name).read_text()

    def rows(p):
        return sorted(
            pq.read_table(p / "summary.parquet").to_pylist(), key=lambda r: (r["call_id"], r["channel"] or "")
        )

    a, b = rows(on_ray), rows(local)
    assert [(r["call_id"], r["status"], r["channel"]) for r in a] == [
        (r["call_id"], r["status"], r["channel"]) for r in b
    ]
    assert [r for r in a if r["status"] == "ok"] == [r for r in b if r["status"] == "ok"]
    # resume on Ray: a finished call is skipped (nothing is sent to Ray Data)
    assert main(["batch", str(archive / "stereo.flac"), "--out", str(on_ray), "--ray", "auto", "--quiet"]) == 0
    assert "1 call(s): 0 analysed" in capsys.readouterr().out
    assert ray.is_initialized()  # the batch did not shut down a Ray session it did not start


def test_missing_ray_extra_is_one_line(monkeypatch, capsys, tmp_path):
    """Without emostream[scale], --ray says how to get it (no traceback)."""
    import emostream
    from emostream.cli import main

    monkeypatch.setitem(sys.modules, "emostream.scale", None)  # as if ray were not importable
    monkeypatch.delattr(emostream, "scale", raising=False)
    for argv, flag in (
        (["serve", "--ray", "--no-model", "--port", "0"], "--ray"),
        (["batch", str(tmp_path), "--ray", "--out", str(tmp_path / "out")], "--ray"),
        (["serve", "--workers", "2", "--no-model", "--port", "0"], "--workers"),
    ):
        (tmp_path / "a.wav").write_bytes(b"")
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag} needs emostream[scale]" in err and len(err.strip().splitlines()) == 1
