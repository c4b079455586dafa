"""The benchmark's smoke mode (`make bench-smoke`): it runs, and every answer under load is right.

Never a timing assertion: the smoke figures measure nothing; only that the harness works end to
end (echo and real servers as processes, the load generator, the answer checks, the memory
run) and that the service answered every call as expected.
"""

import base64
import json
from typing import Any

import pytest

from apikeys.v1 import key_verifier_pb2
from apikeys_server.config import Settings
from bench import h2gen
from bench.echo import ECHO_RESPONSE, echo_server
from bench.workloads import VERIFY_PATH
from tests.bench import ROOT, run_bench

SMOKE_TIMEOUT_SECONDS = 180
SCENARIOS = {
    "echo (first)",
    "authenticated echo (first)",
    "cache hit",
    "cache hit, inline floor",
    "malformed key",
    "unknown key (repeated)",
    "unknown key (fresh each call)",
    "cache miss, SQLite",
}
# Served twice with --before (here HEAD: the mechanism, not a comparison).
TWINNED = {"cache hit", "malformed key", "unknown key (repeated)", "cache miss, SQLite"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One smoke run for the module: its exit status, output and JSON result."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_bytes() if benchmarks.exists() else None
    done = run_bench(
        "--smoke", "--before", "HEAD", "--json", str(out), timeout=SMOKE_TIMEOUT_SECONDS
    )
    after = benchmarks.read_bytes() if benchmarks.exists() else None
    result = json.loads(out.read_text()) if out.exists() else {}
    return {"done": done, "result": result, "benchmarks_unchanged": before == after}


@pytest.mark.e2e
class TestBenchSmoke:
    def test_runs_to_completion(self, smoke: dict[str, Any]) -> None:
        """`python -m bench --smoke` exits 0 and writes its JSON result where asked."""
        done = smoke["done"]
        assert done.returncode == 0, done.stderr[-3000:]
        assert smoke["result"]["options"]["smoke"] is True

    def test_every_scenario_ran(self, smoke: dict[str, Any]) -> None:
        """Both ceilings, cache hit and miss, malformed and unknown keys each completed calls,
        and the --before twins of the Verify rows too."""
        rows = {row["scenario"]: row for row in smoke["result"]["rows"]}
        assert set(rows) == SCENARIOS | {f"{name} (before)" for name in TWINNED}
        for row in rows.values():
            assert row["throughput"] > 0
            assert row["calls_checked"] > 0

    def test_every_answer_was_right(self, smoke: dict[str, Any]) -> None:
        """Every answer under load matched the expected VerifyResponse, byte for byte."""
        for round_ in smoke["result"]["rounds"]:
            for measurement in round_:
                assert measurement["sample_errors"] == [], measurement["scenario"]
                assert measurement["saturation"]["wrong"] == 0, measurement["scenario"]
                assert measurement["saturation"]["reset"] == 0, measurement["scenario"]
                assert measurement["fixed_load"]["wrong"] == 0, measurement["scenario"]
        assert all(row["answers_ok"] for row in smoke["result"]["rows"])

    def test_caches_stay_within_their_bound(self, smoke: dict[str, Any]) -> None:
        """The memory run offers more keys than the bound; both caches stay at the bound."""
        rss = smoke["result"]["rss"]
        assert rss["found"] == rss["keys"]
        assert rss["sizes_full"] == [rss["bound"], rss["bound"]]
        assert rss["sizes_after_overflow"] == [rss["bound"], rss["bound"]]

    def test_leaves_benchmarks_md_alone(self, smoke: dict[str, Any]) -> None:
        """A smoke run never rewrites BENCHMARKS.md: its figures are not measurements."""
        assert smoke["benchmarks_unchanged"]


class TestLoadGeneratorChecksAnswers:
    def _run(self, port: int, expected: list[bytes]) -> dict[str, Any]:
        body = key_verifier_pb2.VerifyRequest(key="ak_x", tenant_id="bench").SerializeToString()
        plan = {
            "host": "127.0.0.1",
            "port": port,
            "path": VERIFY_PATH,
            "headers": [["x-api-key", "ak_caller"]],
            "requests": [
                [base64.b64encode(body).decode(), base64.b64encode(answer).decode()]
                for answer in expected
            ],
            "connections": 1,
            "depth": 4,
            "warmup": 0.0,
            "duration": 0.3,
            "rate": None,
        }
        return h2gen.run(plan)

    def test_counts_wrong_answers(self) -> None:
        """An answer that differs from the expected bytes is counted, so a pass means something."""
        server, port = echo_server(Settings(listen="127.0.0.1:0", workers=2))
        server.start()
        try:
            right = ECHO_RESPONSE.SerializeToString()
            wrong = key_verifier_pb2.VerifyResponse(valid=False, code=4).SerializeToString()
            all_right = self._run(port, [right])
            half_wrong = self._run(port, [right, wrong])
        finally:
            server.stop(0).wait()
        assert all_right["completed"] > 0
        assert all_right["wrong"] == 0
        assert half_wrong["completed"] > 0
        assert 0 < half_wrong["wrong"] < half_wrong["completed"]
