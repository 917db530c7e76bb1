"""A stuck curation says so: rows that stop moving fail the run with a one-line message naming what is
in flight, and ``--resume`` finishes it once the cause is gone.

The stuck rows are URLs the test HTTP server holds open (``/hang/<token>/...``) until the test heals
them; the fetch time-out is longer than the stall limit, so the fetch does not turn the hang into a
drop first.
"""

import json
import os
import shutil
import uuid

import pytest

from pipelines.cli import main
from pipelines.progress import RowActivity, format_in_flight
from tests.conftest import ALLOW_LOCAL
from tests.test_curate_images import _outcomes
from vlp.config import ConfigError, load_config
from vlp.curation.config import CurationConfig


def _clean_rows(samples, n):
    """``n`` sample rows that curation keeps and that duplicate nothing."""
    grouped = set().union(*samples.duplicate_groups) if samples.duplicate_groups else set()
    rows = []
    for line in open(samples.manifest, "rb"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if samples.expected.get(rec.get("key")) == "kept" and rec["key"] not in grouped \
                and "caption" in rec:
            rows.append(rec)
    return rows[:n]


@pytest.mark.ray
def test_a_stuck_run_names_its_rows_in_flight_fails_and_resumes(ray_cluster, samples, http_server,
                                                                tmp_path, capfd):
    dest = os.path.join(http_server.root, "samples")
    if not os.path.exists(dest):
        shutil.copytree(samples.root, dest)
    token = uuid.uuid4().hex[:8]
    rows = _clean_rows(samples, 10)
    stuck = {rows[3]["key"], rows[8]["key"]}
    lines = []
    for rec in rows:
        route = f"hang/{token}" if rec["key"] in stuck else "files"
        lines.append({"key": rec["key"], "caption": rec["caption"],
                      "url": f"{http_server.url}/{route}/samples/{rec['path']}"})
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines))
    out = str(tmp_path / "out")
    command = ["curate", "images", "--input", str(manifest), "--output", out,
               "--set", ALLOW_LOCAL, "--set", "fetch.timeout_s=60", "--set", "fetch.retries=0",
               "--set", "execution.stall_timeout_s=4", "--set", "execution.progress_interval_s=1",
               "--set", "execution.batch_size=2", "--set", "input.rows_per_block=2"]

    try:
        assert main(command) == 2
        err = capfd.readouterr().err
    finally:
        http_server.heal(token)  # the held requests end; the old workers finish and go
    errors = [line for line in err.splitlines() if line.startswith("vlp: error:")]
    assert len(errors) == 1 and "curation stalled" in errors[0] and "--resume" in errors[0], err
    assert "Traceback" not in err
    assert "fetch" in errors[0]  # the one line names the stage the rows are stuck in
    report = err[err.index("stalled: no row has moved on"):]
    fetch_line = next(line for line in report.splitlines() if "fetch:" in line)
    assert any(f"/hang/{token}/" in fetch_line and key in fetch_line for key in stuck), report

    assert main(command + ["--resume"]) == 0
    seen, manifest_json = _outcomes(out)
    assert seen == {r["key"]: "kept" for r in rows}  # every key once: committed or resumed
    assert manifest_json["status"] == "complete"


def test_row_activity_counts_moves_and_names_the_longest_waiting():
    activity = RowActivity()  # no tracker: no reporting thread
    tokens = activity.enter([("a", "http://h/a"), ("b", "http://h/b"), ("a", "http://h/a2")])
    assert len(set(tokens)) == 3  # equal keys are still two rows
    activity.move(tokens[0], "fetch")
    activity.move(tokens[0], "fetch")  # staying is no move
    activity.move(tokens[1:], "fetch")
    moves, in_flight = activity.report()
    assert moves == 3 and in_flight["fetch"]["rows"] == 3
    assert sorted(r[1] for r in in_flight["fetch"]["longest"]) == ["http://h/a", "http://h/a2",
                                                                   "http://h/b"]
    activity.leave(tokens[:2])
    moves, in_flight = activity.report()
    assert moves == 5 and in_flight == {"fetch": {"rows": 1, "longest": [["a", "http://h/a2",
                                                                         in_flight["fetch"]["longest"][0][2]]]}}
    lines, summary = format_in_flight({"w1": in_flight, "w2": {"decode": {"rows": 2, "longest": [
        ["v", "s3://b/v.mp4", 0.0]]}}}, now=100.0)
    assert summary == "decode 2, fetch 1"
    assert lines[0] == "decode: 2 row(s); longest: v s3://b/v.mp4 (100 s)"


def test_stall_timeout_must_not_be_negative():
    assert load_config(CurationConfig, None, ["execution.stall_timeout_s=0"]).execution.stall_timeout_s == 0
    with pytest.raises(ConfigError, match="stall_timeout_s"):
        load_config(CurationConfig, None, ["execution.stall_timeout_s=-1"])
