"""Progress lines reach the user once, also inside a Ray Train worker."""

import builtins
import logging

from jobs.common.progress import Progress, emit


def test_emit_writes_one_line_where_ray_train_patches_print(monkeypatch, capsys, caplog):
    """Ray Train's workers swap `print` for one that prints and logs the same text to the root
    logger (shown on the console too): a stage's line must not go through it."""
    from ray.train.v2._internal.logging.patch_print import redirected_print

    monkeypatch.setattr(builtins, "print", redirected_print)
    with caplog.at_level(logging.INFO):
        emit("[train] 1/2 (50%)")
    assert capsys.readouterr().out == "[train] 1/2 (50%)\n"
    assert not [r for r in caplog.records if "[train]" in r.getMessage()]


def test_progress_lines_without_a_terminal(capsys):
    """Not a terminal: the first result at once and the last line, each line once."""
    import io

    with Progress(3, "eval", every=3600, stream=io.StringIO()) as p:
        p.update(1, tokens=5, correct=1)
        p.update(1, tokens=5)
        p.update(1, tokens=5, correct=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[eval] 1/3 (33%)") and "correct 1" in lines[0]
    assert lines[1].startswith("[eval] 3/3 (100%)") and "correct 2" in lines[1] and "eta 0s" in lines[1]
