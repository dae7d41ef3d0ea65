"""What the entry points print when something unforeseen fails: one line, the traceback in a file."""

from __future__ import annotations

import logging

import pytest

from runner import cli


def failing_with(message: str) -> BaseException:
    try:
        raise IsADirectoryError(message)
    except IsADirectoryError as e:
        return e


def test_an_unforeseen_error_is_one_line_naming_it_with_the_traceback_in_the_jobs_log(tmp_path, capsys):
    log_file = tmp_path / "_generate.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.unexpected(failing_with("[Errno 21] Is a directory: 's3://key:hush-secret@bucket/run/_manifest.json'"))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: unexpected failure (IsADirectoryError: ")
    assert f"the traceback is in {log_file}" in err and "rerun the same command" in err
    logged = log_file.read_text()
    assert "Traceback" in logged and "failing_with" in logged
    assert "hush-secret" not in err + logged  # credentials in URIs masked on the line and in the log


def test_without_a_log_file_the_traceback_gets_a_file_of_its_own(capsys, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not isinstance(h, logging.FileHandler)])
    with pytest.raises(SystemExit):
        cli.unexpected(failing_with("no log"))
    err = capsys.readouterr().err
    where = err.split("the traceback is in ")[1].split(". Committed")[0]
    assert "runner-error-" in where and "Traceback" in open(where).read()
