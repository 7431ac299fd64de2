"""emostream batch without Ray: a folder of good, stereo, empty and corrupt files; the timelines equal
replay --fast's; the Parquet summary; bad files reported, never stopping the batch; resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from emostream.batch import CallInput, find_inputs, read_summary
from emostream.cli import main

from .conftest import EXAMPLES

pq = pytest.importorskip("pyarrow.parquet", reason="batch writes Parquet with pyarrow (emostream[scale])")


def make_folder(root, seconds=8):
    """A call archive: a stereo call (agent, customer), a mono call in a subfolder, an empty file, a
    corrupt mp3, a silent wav and a file that is not audio (ignored: wrong suffix)."""
    root.mkdir(parents=True, exist_ok=True)
    stereo, rate = sf.read(EXAMPLES / "call_stereo.flac")
    sf.write(root / "stereo.flac", stereo[20 * rate : (20 + seconds) * rate], rate)
    mono, rate = sf.read(EXAMPLES / "call_mono.flac")
    (root / "2024-05").mkdir(exist_ok=True)
    sf.write(root / "2024-05" / "mono.wav", mono[: seconds * rate], rate, subtype="PCM_16")
    (root / "empty.wav").write_bytes(b"")
    (root / "corrupt.mp3").write_bytes(b"\xff\xfb\x90\x00" + bytes(range(256)) * 8)
    sf.write(root / "silent.wav", np.zeros(16000 * 3, np.float32), 16000)
    (root / "notes.txt").write_text("not audio")
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("archive") / "calls")


@pytest.fixture(scope="module")
def batch_run(archive, tmp_path_factory, shipped_checkpoint):
    out = tmp_path_factory.mktemp("batch") / "out"
    rc = main(["batch", str(archive), "--out", str(out), "--alert", "Sad>=0.3 for 2s", "--quiet"])
    return rc, out


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_inputs_and_call_ids(archive, tmp_path):
    calls = find_inputs(str(archive))
    assert [c.call_id for c in calls] == ["2024-05__mono", "corrupt", "empty", "silent", "stereo"]
    assert find_inputs(str(archive / "*.flac")) == [CallInput("stereo", str(archive / "stereo.flac"))]
    assert [c.call_id for c in find_inputs(str(archive / "**" / "*.wav"))] == ["2024-05__mono", "empty", "silent"]
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "a.flac").write_bytes(b"")
    assert [c.call_id for c in find_inputs(str(tmp_path))] == ["a.flac", "a.wav"]  # same stem: suffix kept


def test_batch_writes_replay_timelines_and_the_summary_table(batch_run, archive, tmp_path, capsys):
    rc, out = batch_run
    assert rc == 2  # some files failed; the others were analysed
    assert sorted(p.name for p in out.iterdir()) == ["2024-05__mono.jsonl", "stereo.jsonl", "summary.parquet"]
    # every good call's timeline is what replay --fast writes for the same file and options
    for call_id, path, names in (
        ("stereo", archive / "stereo.flac", ["--channel-names", "agent,customer"]),
        ("2024-05__mono", archive / "2024-05" / "mono.wav", []),
    ):
        ref = tmp_path / f"{call_id}.jsonl"
        assert (
            main(
                [
                    "replay",
                    str(path),
                    "--fast",
                    "--no-dashboard",
                    "--events",
                    str(ref),
                    "--stream",
                    call_id,
                    "--alert",
                    "Sad>=0.3 for 2s",
                    *names,
                ]
            )
            == 0
        )
        want, got = lines(ref), lines(out / f"{call_id}.jsonl")
        assert got[:-1] == want[:-1]  # events and alerts, line for line
        summary = got[-1]
        assert {k: v for k, v in summary.items() if k not in ("call_id", "path", "alerts")} == want[-1]
        assert summary["call_id"] == call_id and summary["path"] == str(path)
        assert summary["alerts"] == [a for a in want if a.get("type") == "alert" and a["state"] == "raised"]
    table = pq.read_table(out / "summary.parquet").to_pylist()
    ok = [r for r in table if r["status"] == "ok"]
    assert [(r["call_id"], r["channel"]) for r in ok] == [
        ("2024-05__mono", "ch0"),
        ("stereo", "agent"),
        ("stereo", "customer"),
    ]
    stereo = lines(out / "stereo.jsonl")[-1]
    for r in ok[1:]:
        s = stereo["channels"][r["channel"]]
        assert r["duration"] == stereo["duration"] == pytest.approx(8.0)
        assert (r["speech_seconds"], r["windows"], r["speech_windows"], r["dominant"]) == (
            s["speech_seconds"],
            s["windows"],
            s["speech_windows"],
            s["dominant"],
        )
        # a channel without speech has no shares (null, NaN in pandas), not 0.0 (#42 item 9)
        assert {c: r[f"share_{c}"] for c in s["shares"]} == (
            s["shares"] if s["speech_seconds"] else dict.fromkeys(s["shares"])
        )
        assert r["peaks"] == s["peaks"]
        assert (
            r["alerts_raised"] == len(r["alerts"]) == len([a for a in stereo["alerts"] if a["channel"] == r["channel"]])
        )
    errors = {r["call_id"]: r["error"] for r in table if r["status"] == "error"}
    assert set(errors) == {"corrupt", "empty", "silent"}
    assert "cannot read audio" in errors["corrupt"] and "empty" in errors["empty"] and "silent" in errors["silent"]
    assert "not a valid audio file" in errors["corrupt"] and "does not exist" not in errors["corrupt"]
    assert all(r["channel"] is None and r["alerts"] == [] for r in table if r["status"] == "error")


def test_every_line_and_row_names_its_type_model_and_start(batch_run, archive):
    """#42 item 5: a type on every JSONL line; the summary line and each Parquet row name the model
    (checkpoint name + 12 hex digits of the weights' SHA-256) and the call's UTC ISO 8601 start."""
    from datetime import datetime

    from emostream.model import model_identity

    _, out = batch_run
    model = model_identity()
    got = lines(out / "stereo.jsonl")
    assert {x["type"] for x in got[:-1]} <= {"event", "alert"} and got[-1]["type"] == "summary"
    assert all("type" in x for x in got)
    summary = got[-1]
    assert summary["model"] == model and len(model["sha256"]) == 12 and model["name"] == "emostream-resnet50"
    start = datetime.fromisoformat(summary["started_at"].replace("Z", "+00:00"))
    assert start.utcoffset().total_seconds() == 0 and summary["started_at"].endswith("Z")
    mtime = os.stat(archive / "stereo.flac").st_mtime  # a recording: its mtime minus its duration
    assert start.timestamp() == pytest.approx(mtime - summary["duration"], abs=0.01)
    table = pq.read_table(out / "summary.parquet").to_pylist()
    assert all(r["model"] == model["name"] and r["model_sha256"] == model["sha256"] for r in table)
    assert {r["started_at"] for r in table if r["call_id"] == "stereo"} == {summary["started_at"]}


def test_resume_skips_finished_calls(archive, tmp_path, capsys, shipped_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stereo.jsonl.part").write_text('{"half": "written"}\n')  # a run that died mid-call
    assert main(["batch", str(archive / "*.flac"), "--out", str(out), "--quiet"]) == 0
    first = (out / "stereo.jsonl").stat().st_mtime_ns
    assert not (out / "stereo.jsonl.part").exists()
    capsys.readouterr()
    assert main(["batch", str(archive / "*.flac"), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 call(s): 0 analysed" in line and "1 already done" in line
    assert (out / "stereo.jsonl").stat().st_mtime_ns == first
    assert [r["call_id"] for r in pq.read_table(out / "summary.parquet").to_pylist()] == ["stereo", "stereo"]
    # a second folder of calls into the same OUT: only the new ones run; the table holds all
    assert main(["batch", str(archive / "2024-05"), "--out", str(out), "--quiet"]) == 0
    assert sorted({r["call_id"] for r in pq.read_table(out / "summary.parquet").to_pylist()}) == ["mono", "stereo"]
    assert (out / "stereo.jsonl").stat().st_mtime_ns == first
    assert read_summary(out / "mono.jsonl")["channels"].keys() == {"ch0"}


def test_analyse_customer_and_channel_names(archive, tmp_path, shipped_checkpoint):
    out = tmp_path / "out"
    rc = main(["batch", str(archive), "--out", str(out), "--analyse", "customer", "--vad", "energy", "--quiet"])
    assert rc == 2
    table = pq.read_table(out / "summary.parquet").to_pylist()
    assert [(r["call_id"], r["channel"]) for r in table if r["status"] == "ok"] == [("stereo", "customer")]
    errors = {r["call_id"]: r["error"] for r in table if r["status"] == "error"}
    assert "no customer channel" in errors["2024-05__mono"]  # a mono mix is never analysed as the customer
    events = lines(out / "stereo.jsonl")
    assert {e["channel"] for e in events if "t_end" in e} == {"customer"}
    out2 = tmp_path / "out2"
    assert (
        main(
            [
                "batch",
                str(archive / "stereo.flac"),
                "--out",
                str(out2),
                "--channel-names",
                "caller,rep",
                "--vad",
                "energy",
                "--quiet",
            ]
        )
        == 0
    )
    assert set(read_summary(out2 / "stereo.jsonl")["channels"]) == {"caller", "rep"}
    assert (
        main(
            [
                "batch",
                str(archive / "2024-05"),
                "--out",
                str(out2),
                "--channel-names",
                "caller,rep",
                "--vad",
                "energy",
                "--quiet",
            ]
        )
        == 2
    )  # a mono file does not have two channels


def test_two_worker_processes_give_the_same_timelines(archive, batch_run, tmp_path):
    _, reference = batch_run
    out = tmp_path / "out"
    assert (
        main(["batch", str(archive), "--out", str(out), "--workers", "2", "--alert", "Sad>=0.3 for 2s", "--quiet"]) == 2
    )
    for name in ("stereo.jsonl", "2024-05__mono.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()
    assert (
        pq.read_table(out / "summary.parquet").to_pylist() == pq.read_table(reference / "summary.parquet").to_pylist()
    )


def test_batch_plots_and_bad_arguments(archive, tmp_path, capsys, shipped_checkpoint):
    out = tmp_path / "out"
    assert (
        main(
            ["batch", str(archive / "stereo.flac"), "--out", str(out), "--plots", "html", "--vad", "energy", "--quiet"]
        )
        == 0
    )
    assert (out / "stereo.html").read_text().count("<svg") == 2
    capsys.readouterr()
    for argv, message in (
        (["batch", str(tmp_path / "nothing-here"), "--out", str(out)], "no such file or folder"),
        (["batch", str(out), "--out", str(tmp_path / "o")], "no audio files"),
        (["batch", str(archive), "--out", str(out / "stereo.html")], "not a directory"),
        (["batch", str(archive), "--out", str(out), "--workers", "0"], "must be > 0"),
        (
            ["batch", str(archive), "--out", str(out), "--alert-webhook", "http://127.0.0.1:9/"],
            "needs at least one --alert",
        ),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


def test_batch_posts_alerts_to_the_webhook(archive, tmp_path, shipped_checkpoint):
    from .test_alerts import Endpoint

    with Endpoint() as ep:
        assert (
            main(
                [
                    "batch",
                    str(archive / "stereo.flac"),
                    "--out",
                    str(tmp_path / "out"),
                    "--vad",
                    "energy",
                    "--alert",
                    "Neutral>=0.0 for 2s",
                    "--alert-webhook",
                    ep.url,
                    "--quiet",
                ]
            )
            == 0
        )
    written = [x for x in lines(tmp_path / "out" / "stereo.jsonl") if x.get("type") == "alert"]
    assert written and [b for b, _ in ep.posts] == written


def test_batch_takes_every_format_and_says_what_it_skipped(tmp_path, shipped_checkpoint):
    """#42 item 9, through the CLI: an .opus call (which replay and classify read) is analysed, the
    files that are not audio are listed on stderr with the reason; in the table a channel without
    speech has NaN shares and the integer columns stay integers (pandas)."""
    import subprocess
    import sys

    from .conftest import ROOT

    calls = tmp_path / "calls"
    calls.mkdir()
    mono, rate = sf.read(EXAMPLES / "call_mono.flac")
    with sf.SoundFile(calls / "phone.opus", "w", 48000, 1, format="OGG", subtype="OPUS") as f:
        from emostream.audio import resample

        f.write(resample(mono[: 6 * rate].astype(np.float32), rate, 48000))
    left = mono[: 6 * rate]
    sf.write(calls / "one_sided.wav", np.stack([np.zeros_like(left), left], axis=1), rate)  # agent silent
    (calls / "notes.txt").write_text("not audio")
    (calls / "call.m4a").write_bytes(b"\0" * 64)
    (calls / "broken.wav").write_bytes(b"")  # a failed call: its row must not turn the int columns into floats
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "emostream",
            "batch",
            str(calls),
            "--out",
            str(tmp_path / "out"),
            "--vad",
            "energy",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2, r.stderr  # broken.wav failed
    assert "skipped 2 file(s)" in r.stderr and "notes.txt (not an audio format (.txt))" in r.stderr
    assert "call.m4a (not an audio format (.m4a))" in r.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["one_sided.jsonl", "phone.jsonl"]
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(tmp_path / "out" / "summary.parquet").set_index(["call_id", "channel"])
    assert df.loc[("phone", "ch0"), "speech_seconds"] > 0
    agent = df.loc[("one_sided", "agent")]
    assert agent["speech_seconds"] == 0 and all(np.isnan(agent[f"share_{c}"]) for c in ("Angry", "Neutral", "Sad"))
    assert df.loc[("one_sided", "customer"), "share_Neutral"] >= 0
    assert (df["status"] == "error").sum() == 1
    for column in ("windows", "speech_windows", "alerts_raised"):
        assert df[column].dtype.kind == "i", column
