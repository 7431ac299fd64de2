"""The CV-fitted softmax temperatures of a shipped checkpoint: ``cv_report.json`` files read and checked
for the temperature each gives, and stored in the checkpoint's ``model.json`` (``python -m train
calibrate``, ``fit --all --cv-report``)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError


def read_cv_report(path: str, clip: bool) -> dict:
    """A ``cv_report.json``, checked to be scored the way its temperature will be used: one placement
    per chunk for the window temperature (``clip`` False), several for the clip temperature."""
    try:
        report = json.loads(Path(path).read_text())
        positions = int((report.get("config") or {}).get("inference_positions") or 1)
        report["temperature"] = float(report["temperature"])
        if not {"protocol", "summary", "summary_telephone"} <= set(report):
            raise KeyError("summary")
    except FileNotFoundError:
        raise FileNotFoundError(f"no CV report at {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(f"{path} is not a cv_report.json of python -m train cv") from None
    if clip and positions == 1:
        raise ConfigError(
            f"{path} was scored with one placement: a clip temperature needs a CV scored with "
            "emostream.inference_positions > 1 (pass it as --cv-report)"
        )
    if not clip and positions > 1:
        raise ConfigError(
            f"{path} was scored with {positions} placements: the window temperature needs a CV "
            "scored with one (pass this one as --clip-cv-report)"
        )
    return report


def cv_metadata(cv: dict, clip_cv: dict | None) -> dict:
    """What a checkpoint's ``model.json`` keeps of its CV reports: the experiment each comes from,
    protocol, summaries, temperatures."""

    def experiment(report: dict) -> str | None:
        return (report.get("config") or {}).get("experiment_name")

    out = {
        "experiment": experiment(cv),
        "protocol": cv["protocol"],
        "summary": cv["summary"],
        "summary_telephone": cv["summary_telephone"],
        "temperature": cv["temperature"],
    }
    if clip_cv:
        out.update(
            {
                "clip_experiment": experiment(clip_cv),
                "clip_protocol": clip_cv["protocol"],
                "clip_summary": clip_cv["summary"],
                "clip_temperature": clip_cv["temperature"],
            }
        )
    return out


def store_calibration(checkpoint: str | Path, cv: dict, clip_cv: dict | None) -> None:
    """Store the CV-fitted softmax temperatures (single window; clip, or none) in the checkpoint's
    model config, and the reports' figures in its CV metadata."""
    meta_path = Path(checkpoint) / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["temperature"] = cv["temperature"]
    meta["model"]["clip_temperature"] = clip_cv["temperature"] if clip_cv else None
    meta["cv"] = cv_metadata(cv, clip_cv)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
