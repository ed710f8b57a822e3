"""The state dir's removal when a helper removes its own files at the same moment.

slirp4netns unlinks its API socket when it winds down (its exit fd closed). When it
outlives our SIGKILL (a wrapper script in its place, as some distributions install),
that unlink races our removal of the state dir: the entry is listed, then gone when we
unlink it. The race is replayed here with a real listing taken before the removal."""
import os

from rootless.state import statedir


def test_an_entry_removed_by_a_helper_meanwhile_is_not_an_error(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    for name in ("lock", "slirp4netns.sock", "child_pid"):
        (state / name).write_text("")
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        listing = list(os.scandir(fd))   # what our scandir saw...
        (state / "slirp4netns.sock").unlink()  # ...before slirp4netns removed its socket

        real_scandir = os.scandir
        monkeypatch.setattr(statedir.os, "scandir",
                            lambda where: iter(listing) if where == fd else real_scandir(where))
        statedir._remove_entries(fd)
    finally:
        os.close(fd)

    assert list(state.iterdir()) == []
