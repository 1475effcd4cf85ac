"""The UI's helpers that need no server: status words, README rendering, model request examples."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

from cml_appliance.models import example_request
from cml_appliance.projects import readme
from cml_appliance.web import status_words
from cml_appliance.workloads import states

SWAGGER = Path(__file__).resolve().parents[1] / "data" / "cml-api-v2.swagger.json"


def test_every_status_cml_defines_has_a_word_and_the_raw_value_is_never_the_word() -> None:
    definitions = json.loads(SWAGGER.read_text())["definitions"]
    values = definitions["EngineStatus"]["enum"] + definitions["ApplicationStatus"]["enum"] + definitions["ExperimentRunStatus"]["enum"]
    values += ["pending", "succeeded", "built", "build failed", "timedout", "pushing", "queued", "unknown"]  # ModelBuild
    values += ["deployed", "deploying", "stopping", "stopped", "failed", "not deployed", "not built"]  # ModelDeployment
    values += list(states.TRANSITIONS)
    for value in values:
        assert value in status_words.WORDS, value
        word = status_words.status_word(value)
        assert word.word and word.word != value and "_" not in word.word, (value, word)
        assert word.tone in {"ok", "busy", "done", "bad", "idle"}
    assert status_words.status_word("ENGINE_RUNNING").word == "Running"
    assert status_words.status_word("ENGINE_TIMEDOUT").word == "Timed out"
    assert status_words.status_word("build failed").tone == "bad"
    # Something new is shown as itself, readably, not hidden.
    assert status_words.status_word("ENGINE_HIBERNATING").word == "Hibernating"
    # The browser's copy is the same table, safe inside a <script> element.
    table = json.loads(str(status_words.words_json()))
    assert table["APPLICATION_STARTING"] == {"word": "Starting", "tone": "busy", "icon": "◔"}
    assert "<" not in str(status_words.words_json())


def test_ended_summary_says_why_with_which_code_and_for_how_long() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    row = SimpleNamespace(status=states.FAILED, reason="the main process exited with code 3", exit_code=3,
                          created_at=start, starting_at=start, running_at=start + timedelta(seconds=2),
                          finished_at=start + timedelta(minutes=3, seconds=22))
    assert status_words.ended_summary(row) == {"reason": "the main process exited with code 3", "exit_code": "3", "duration": "3 min 20 s"}
    assert status_words.duration(start, start + timedelta(hours=2, minutes=5)) == "2 h 5 min"
    assert status_words.duration(start, None) == ""


def test_readme_is_rendered_without_raw_html_or_script_links(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(
        "# Title\n\n<script>alert(1)</script>\n<img src=x onerror=alert(1)>\n[bad](javascript:alert(1)) [worse](JaVaScRiPt:alert(1))\n"
        "[file](docs/a%20b.md) [out](../../etc/passwd) [web](https://example.org) ![pic](img/p.png) ![svg](evil.svg)\n")
    name = readme.find(tmp_path)
    html = readme.render(tmp_path, name, "pid")
    assert "<script>" not in html and "<img src=x" not in html and "&lt;script&gt;" in html
    assert 'href="javascript' not in html.lower()
    assert 'href="/projects/pid/files/docs/a%20b.md"' in html
    assert 'href="#"' in html  # a link out of the project leads nowhere
    assert 'rel="noopener noreferrer nofollow"' in html
    assert 'src="/projects/pid/download/img/p.png?inline=1"' in html


def test_readme_is_found_case_insensitively_and_plain_text_is_preformatted(tmp_path: Path) -> None:
    assert readme.find(tmp_path) is None
    (tmp_path / "README").write_text("plain <b>text</b>\n```\n")
    html = readme.render(tmp_path, readme.find(tmp_path) or "", "pid")
    assert html.startswith("<pre><code>") and "&lt;b&gt;" in html


def test_example_request_comes_from_the_keys_the_function_reads() -> None:
    source = b"""
import json
def helper(x):
    return x["not this"]
def predict(args):
    a = float(args["petal_length"])
    b = args.get("species", "setosa")
    c = args.get("count", 3)
    return {"a": a, "b": b, "c": c, "again": args["petal_length"]}
"""
    example = json.loads(example_request.from_source(source, "predict") or "")
    assert example == {"petal_length": 0, "species": "setosa", "count": 3}
    assert example_request.from_source(b"def predict(args):\n    return 1\n", "predict") == "{}"
    assert example_request.from_source(b"def predict(:\n", "predict") is None
    assert example_request.from_source(b"predict = lambda a: a\n", "predict") is None
