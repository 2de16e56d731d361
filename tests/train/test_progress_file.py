"""The driver's training bar mirrors the rank-0 worker's progress file: steps and loss show, an earlier launch's
record is not taken for this one's, and the launch is timed from the worker's own records."""

import time

from i2l.train.progress_file import ProgressMirror, read_progress, write_progress


def test_the_bar_follows_the_file_and_the_launch_is_timed(tmp_path, capfd):
    write_progress(tmp_path, started=0.0, first_step=0.0, step=99, loss=9.0)  # an earlier launch's last record
    with ProgressMirror(tmp_path, total=5, every_s=0.02) as mirror:
        assert read_progress(tmp_path) is None  # removed on entry
        started = time.time()
        write_progress(tmp_path, started=started)
        time.sleep(0.1)
        first = time.time()
        for step in range(1, 6):
            write_progress(tmp_path, started=started, first_step=first, step=step, loss=1.0 / step)
            time.sleep(0.05)
    err = capfd.readouterr().err
    assert "train i2L" in err and "5/5" in err and "loss=0.2000" in err
    assert "99/5" not in err
    t = mirror.timings()
    assert 0 <= t["worker_started_s"] < t["first_step_s"] <= t["last_step_s"]
    assert not list(tmp_path.glob("*.tmp"))  # written whole, no temporaries left


def test_nothing_written_means_no_timings_and_a_quiet_bar_when_asked(tmp_path, capfd):
    with ProgressMirror(tmp_path, total=3, show=False, every_s=0.02) as mirror:
        time.sleep(0.05)
    assert mirror.timings() == {}
    assert "train i2L" not in capfd.readouterr().err


def test_the_worker_writes_its_first_and_last_step_and_at_most_every_interval_between(tmp_path):
    from i2l.train.progress_file import ProgressWriter

    w = ProgressWriter(tmp_path, total=3, every_s=3600)
    assert read_progress(tmp_path)["started"] == w.started
    w.step(1, 0.5)
    assert read_progress(tmp_path)["step"] == 1
    w.step(2, 0.4)  # within the interval: not written
    assert read_progress(tmp_path)["step"] == 1
    w.step(3, 0.3)  # the last step always is
    rec = read_progress(tmp_path)
    assert (rec["step"], rec["loss"], rec["first_step"]) == (3, 0.3, w.first_step)
