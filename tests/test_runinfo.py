"""run.json records what a result depends on; a resume under other settings warns in one line
naming what changed; --threads sets the run's thread count; --rank-timeout is refused where it
would do nothing."""
import json
import os
import warnings

import pytest
import torch
from cli_helpers import one_line, run_main

from metadd_fast import runinfo
from metadd_fast.errors import InputError

TINY = ["distill", "--ipc", "1", "--iterations", "1", "--batch-real", "8", "--arch", "ConvNetD1", "--size", "8"]


@pytest.fixture
def threads():
    """Restore the process's thread count after a test that changes it (--threads does)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_collect_reads_the_settings(threads):
    torch.set_num_threads(1)
    env = runinfo.collect(7, "cuda:0")
    assert env["seed"] == 7 and env["threads"] == 1 and env["world_size"] == 1 and env["device_type"] == "cuda"
    assert env["deterministic"] is torch.are_deterministic_algorithms_enabled()
    assert env["versions"]["torch"] == torch.__version__ and env["cpu_capability"]
    torch.set_num_threads(2)
    assert runinfo.collect(7)["threads"] == 2 and runinfo.collect(7)["device_type"] == "cpu"
    assert json.loads(json.dumps(env)) == env  # a JSON object


def test_changes_name_what_changes_the_result():
    env = runinfo.collect(0)
    other = dict(env, threads=env["threads"] + 1, deterministic=not env["deterministic"], world_size=4,
                 versions=dict(env["versions"], torch="0.0"))
    assert runinfo.changes(env, env) == []
    assert runinfo.changes(env, other) == [f"threads {env['threads']} -> {env['threads'] + 1}",
                                           f"deterministic {env['deterministic']} -> {not env['deterministic']}",
                                           f"torch {torch.__version__} -> 0.0"]
    assert runinfo.changes(env, dict(env, world_size=8)) == []  # ranks give the one-process result


def test_note_keeps_the_first_launch_and_warns_once_on_a_change(tmp_path):
    path = str(tmp_path / "run.json")
    (tmp_path / "run.json").write_text(json.dumps({"digest": "abc"}))
    env = runinfo.collect(0)
    assert runinfo.note(path, env) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: no warning
        assert runinfo.note(path, dict(env, world_size=2)) == []
    changed = dict(env, threads=env["threads"] + 1)
    with pytest.warns(runinfo.ResumeWarning) as caught:
        assert runinfo.note(path, changed) == [f"threads {env['threads']} -> {env['threads'] + 1}"]
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert f"threads {env['threads']} -> {env['threads'] + 1}" in str(caught[0].message)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["digest"] == "abc" and run["environment"] == env and run["resumes"] == [changed]
    (tmp_path / "run.json").write_text("[1]")
    with pytest.raises(InputError, match="corrupt run description"):
        runinfo.note(path, env)


@pytest.mark.parametrize("chunked", [True, False], ids=["engine", "one-process"])
def test_cli_resume_under_another_thread_count_warns_in_one_line(tmp_path, capsys, threads, chunked):
    argv = TINY + (["--classes-per-chunk", "5"] if chunked else []) + ["--out", str(tmp_path)]
    code, err = run_main(argv + ["--threads", "1"], capsys)
    assert code == 0 and "warning" not in err, err
    assert torch.get_num_threads() == 1
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["environment"]["threads"] == 1 and run["environment"]["world_size"] == 1
    if chunked:
        os.remove(tmp_path / "chunks" / "chunk_00001.pt")  # as if killed in the second chunk
    code, err = run_main(argv + ["--threads", "1"], capsys)
    assert code == 0 and "warning" not in err, err
    code, err = run_main(argv + ["--threads", "2"], capsys)
    assert code == 0 and torch.get_num_threads() == 2
    one_line(err, "metadd-fast distill: warning: resuming", "(threads 1 -> 2)", "may differ")
    assert json.loads((tmp_path / "run.json").read_text())["resumes"][0]["threads"] == 2


@pytest.mark.parametrize("extra, words", [
    (["--threads", "0"], "argument --threads: expected a positive int, got '0'"),
    (["--rank-timeout", "5"], "argument --rank-timeout: applies to distributed runs only"),
    (["--rank-timeout", "5", "--classes-per-chunk", "5"], "argument --rank-timeout: applies to distributed runs "
                                                          "only"),
    (["--rank-timeout", "nan", "--classes-per-chunk", "5"], "argument --rank-timeout: expected a finite float > 0"),
])
def test_bad_threads_and_rank_timeout_are_refused(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, err = run_main(TINY + extra + ["--out", str(tmp_path / "run")], capsys)
    assert code == 2
    one_line(err, words)
    assert not (tmp_path / "run").exists()
