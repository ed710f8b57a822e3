"""--copy-up keeps symlinks working (issue 19; rootlesskit issue #225): every symlink in a
copied-up dir, at any depth, resolves inside the namespace as it does outside.

Each test runs one script (CHECK) outside and inside a real instance, as the test user:
for every path, `readlink -f` and the md5 of what it leads to (a dir: its listing), then
compares them path by path. Inside, a path into the hidden copy of a dir names the
original: it is mapped back through the copy-up's own top-level links (DIR/NAME ->
.roXXXX-NAME, DIR/NAME -> .roXXXX/NAME) before the comparison; nothing else is."""
import os
import re
import shutil
import subprocess
import tempfile
import uuid

import pytest

# $1: a file of paths, one a line; $2...: the copied-up dirs. One line per fact:
# R path realpath (or !), D path listing (of a dir), L entry linktext (the top-level
# links of the copied-up dirs), M md5 path (of each regular file it leads to).
CHECK = r"""
list=$1; shift
while IFS= read -r p; do
    printf 'R\t%s\t' "$p"; readlink -f -- "$p" 2>/dev/null || echo '!'
    if [ -d "$p" ]; then printf 'D\t%s\t' "$p"; ls -A -- "$p" 2>/dev/null | tr '\n' '/'; echo; fi
done < "$list"
for dir; do
    for e in "$dir"/* "$dir"/.[!.]* "$dir"/..?*; do
        if [ -L "$e" ]; then printf 'L\t%s\t' "$e"; readlink -- "$e"; fi
    done
done
while IFS= read -r p; do
    if [ -f "$p" ]; then printf '%s\0' "$p"; fi
done < "$list" | xargs -0 -r md5sum -- 2>/dev/null | sed 's/^/M\t/'
"""

HIDDEN = re.compile(r"^\.ro[0-9a-f]{10}")
# Each namespace has its own view there (/etc/mtab -> ../proc/self/mounts): compared is
# only whether the path leads somewhere readable, not what it reads.
OWN_VIEW = ("/proc/", "/sys/", "/dev/")
LONG = "d" * 250  # HIDDEN-NAME would be longer than a name may be


@pytest.fixture
def scratch():
    """A dir of root's the test user can read: the script, the path lists, the trees."""
    path = tempfile.mkdtemp(prefix="rlt-copyup-")
    os.chmod(path, 0o755)
    with open(os.path.join(path, "check.sh"), "w") as f:
        f.write(CHECK)
    mounted = []
    try:
        yield path, mounted
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(path)


class Seen:
    """What CHECK printed: per path, where it leads and what it holds."""

    def __init__(self, stdout: str):
        self.real, self.listing, self.links, self.md5 = {}, {}, {}, {}
        for line in stdout.splitlines():
            kind, _, rest = line.partition("\t")
            if kind == "M":
                digest, _, path = rest.partition("  ")
                self.md5[path] = digest
            elif kind in ("R", "D", "L"):
                path, _, value = rest.partition("\t")
                {"R": self.real, "D": self.listing, "L": self.links}[kind][path] = value

    def hidden_names(self) -> dict[str, str]:
        """Inside: the hidden copy's paths -> the paths they stand for, read from the
        top-level links of the copied-up dirs."""
        names = {}
        for entry, text in self.links.items():
            top = os.path.dirname(entry)
            if HIDDEN.match(text) and "/" not in text:    # DIR/NAME -> .roXXXX-NAME
                names[os.path.join(top, text)] = entry
            elif HIDDEN.match(text) and text.count("/") == 1:  # DIR/NAME -> .roXXXX/NAME
                names[os.path.join(top, text.split("/")[0])] = top
        return names

    def view(self, path: str, hidden: dict[str, str]) -> tuple:
        real = _canonical(self.real[path], hidden)
        content = self.md5.get(path, "-")
        listing = sorted(n for n in self.listing.get(path, "").split("/")
                         if n and not HIDDEN.match(n))
        if real.startswith(OWN_VIEW):
            content, listing = content != "-", None
        return real, content, listing


def _canonical(real: str, hidden: dict[str, str]) -> str:
    real = re.sub(r"^/proc/\d+/task/\d+(?=/|$)", "/proc/thread-self", real)
    real = re.sub(r"^/proc/\d+(?=/|$)", "/proc/self", real)
    for copy in sorted(hidden, key=len, reverse=True):
        if real == copy or real.startswith(copy + "/"):
            return hidden[copy] + real[len(copy):]
    return real


def write_list(scratch_dir: str, paths: list[str]) -> str:
    path = os.path.join(scratch_dir, f"paths-{uuid.uuid4().hex[:8]}")
    with open(path, "w") as f:
        f.writelines(p + "\n" for p in paths)
    return path


def check(user, rootless_run, scratch_dir: str, paths: list[str], copy_up: list[str],
          then: str = "") -> tuple[dict, dict]:
    """Every path's view outside and inside `--copy-up` of each of `copy_up` (after which
    the shell command `then` runs inside)."""
    script = os.path.join(scratch_dir, "check.sh")
    listed = write_list(scratch_dir, paths)
    outside = user.run(["sh", script, listed, *copy_up], timeout=120)
    assert outside.returncode == 0, outside.stderr
    inside = user.run([rootless_run, "--net=none", *(f"--copy-up={d}" for d in copy_up),
                       "--", "sh", "-c", f'sh "$0" "$@" && {then or "true"}', script, listed,
                       *copy_up], timeout=120)
    assert inside.returncode == 0, inside.stderr
    seen_out, seen_in = Seen(outside.stdout), Seen(inside.stdout)
    hidden = seen_in.hidden_names()
    assert hidden, "no link into a hidden copy inside: was the dir copied up?"
    return ({p: seen_out.view(p, {}) for p in paths},
            {p: seen_in.view(p, hidden) for p in paths})


def assert_same(outside: dict, inside: dict) -> None:
    wrong = [f"{p}: outside {outside[p]}, inside {inside[p]}"
             for p in outside if outside[p] != inside[p]]
    assert not wrong, f"{len(wrong)} of {len(outside)} paths differ:\n" + "\n".join(wrong[:30])


def symlinks_under(top: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Every symlink below `top` (links to dirs included, not followed), but those
    below `skip` and those whose names a line or md5sum's output could not carry."""
    found = []
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.islink(path) and not any(c in path for c in "\n\t\\"):
                found.append(path)
    return sorted(found)


def everything_under(top: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(top):
        out += [os.path.join(root, n) for n in dirs + files]
    return sorted(out)


def snapshot(top: str) -> dict:
    """What a command could change below `top`: types, modes, link texts, contents."""
    state = {}
    for path in [top, *everything_under(top)]:
        st = os.lstat(path)
        if os.path.islink(path):
            state[path] = ("link", os.readlink(path))
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                state[path] = ("file", st.st_mode, f.read())
        else:
            state[path] = ("dir", st.st_mode, st.st_uid)
    return state


# -- a tree of every kind of link ------------------------------------------------------

def build_tree(base: str, mounted: list) -> str:
    """base/tree, the dir to copy up, with links at the top and below it, up (out of the
    tree), sideways, absolute, dangling, looping, to dirs and through other links; and
    base/outside, where links climb out to. Returns base/tree."""
    tree = os.path.join(base, "tree")
    overshoot = "../" * 12 + base.lstrip("/") + "/outside/o.txt"
    files = {"outside/o.txt": "outside", "outside/odir/f.txt": "in odir",
             "tree/file.txt": "top", "tree/sub/f.txt": "sub", "tree/sub/deep/g.txt": "deep",
             "tree/sub2/h.txt": "sub2", "tree/.hidden/x.txt": "hidden",
             "tree/a dir/y.txt": "spaced", f"tree/{LONG}/z.txt": "long",
             "tree/private/p.txt": "private"}
    for relative, text in files.items():
        path = os.path.join(base, relative)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    os.makedirs(os.path.join(tree, "empty"), mode=0o755)
    # A mount below the tree (as /run/user/UID is below /run): it is copied up with it.
    os.mkdir(os.path.join(tree, "mnt"), 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "rlt-copyup",
                    os.path.join(tree, "mnt")], check=True)
    mounted.append(os.path.join(tree, "mnt"))
    links = {
        # at the top of the copied-up dir
        "top_up": "../outside/o.txt", "top_up_dir": "../outside/odir",
        "top_side": "file.txt", "top_chain": "top_side", "top_dir": "sub",
        "top_abs": os.path.join(base, "outside/o.txt"),
        "top_abs_in": os.path.join(tree, "sub/deep"), "top_dangling": "missing",
        "top_dangling_up": "../outside/missing", "top_overshoot": overshoot,
        "top_loop": "top_loop",
        # one level down
        "sub/up1": "../file.txt", "sub/up2": "../../outside/o.txt",
        "sub/up2_dir": "../../outside/odir", "sub/side": "f.txt", "sub/side_dir": "../sub2",
        "sub/chain": "../top_up", "sub/abs": os.path.join(tree, "sub2/h.txt"),
        "sub/dangling": "../../outside/missing", "sub/dangling_dir": "../nodir/x",
        "sub/tree_root": "..", "sub/base": "../..", "sub/loop_a": "loop_b",
        "sub/loop_b": "loop_a",
        # two levels down
        "sub/deep/up1": "../f.txt", "sub/deep/up2": "../../file.txt",
        "sub/deep/up3": "../../../outside/o.txt", "sub/deep/up3_dir": "../../../outside/odir",
        "sub/deep/via": "../../sub2/h.txt", "sub/deep/overshoot": overshoot,
        "sub2/back": "../sub/deep/g.txt", "sub2/deep_dir": "../sub/deep",
        # dirs of every kind of name, mode and origin
        ".hidden/up": "../../outside/o.txt", "a dir/link x": "../file.txt",
        f"{LONG}/up": "../../outside/o.txt", "private/up": "../file.txt",
        "mnt/up": "../../outside/o.txt", "mnt/side": "../sub/f.txt",
    }
    for relative, text in links.items():
        os.symlink(text, os.path.join(tree, relative))
    os.chmod(os.path.join(tree, "private"), 0o700)
    return tree


# Paths through links to dirs, then on through relative links below them.
THROUGH = ["top_dir/up2", "top_dir/deep/up3", "top_abs_in/up3", "sub2/deep_dir/up3",
           "sub/side_dir/back", "sub/tree_root/sub/up2", "sub/deep/up3_dir/f.txt",
           "top_up_dir/f.txt", "sub/base/outside/o.txt"]


def test_links_in_a_copied_up_tree_resolve_as_outside(user, rootless_run, scratch):
    base, mounted = scratch
    tree = build_tree(base, mounted)
    paths = everything_under(tree) + [os.path.join(tree, p) for p in THROUGH]
    before = snapshot(tree)
    outside, inside = check(user, rootless_run, base, paths, [tree])

    o_txt = os.path.join(base, "outside/o.txt")
    for link in ("top_up", "top_overshoot", "sub/up2", "sub/chain", "sub/deep/up3",
                 "mnt/up", f"{LONG}/up", ".hidden/up", "top_dir/deep/up3"):
        assert outside[os.path.join(tree, link)][0] == o_txt, link  # the test's own premise
    assert_same(outside, inside)
    assert snapshot(tree) == before


def test_copied_up_tree_is_writable_inside(user, rootless_run, scratch):
    """A new file, a link replaced, a subdir's link replaced by a dir of its own; the
    original is left as it was."""
    base, mounted = scratch
    tree = build_tree(base, mounted)
    before = snapshot(tree)
    r = user.run([rootless_run, "--net=none", f"--copy-up={tree}", "--", "sh", "-c",
                  f'cd "{tree}" && echo new > new.txt && rm top_side && echo mine > top_side'
                  f' && rm -f sub && mkdir sub && echo own > sub/f.txt'
                  f' && cat new.txt top_side sub/f.txt top_up'])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "new\nmine\nown\noutside\n"
    assert snapshot(tree) == before


# -- the real /etc and /run --------------------------------------------------------------

def test_every_symlink_under_etc_resolves_as_outside(user, rootless_run, scratch):
    """/etc/mtab, /etc/rc*.d/*, /etc/alternatives/*, /etc/ssl/certs/*...: all of them."""
    base, _ = scratch
    paths = symlinks_under("/etc")
    outside, inside = check(user, rootless_run, base, paths, ["/etc"])
    if "/etc/mtab" in outside:
        assert outside["/etc/mtab"][:2] == ("/proc/self/mounts", True)
    assert sum(view[0] != "!" for view in outside.values()) > len(paths) // 2
    assert_same(outside, inside)


@pytest.fixture
def planted_in_run():
    """A dir of links in /run (and two links at its top) that climb out of /run and back:
    what a daemon's runtime dir may hold. Removed after."""
    name = f"rlt-copyup-{uuid.uuid4().hex[:8]}"
    top = os.path.join("/run", name)
    created = [os.path.join("/run", f"{name}-up"), os.path.join("/run", f"{name}-side")]
    os.makedirs(os.path.join(top, "sub"), mode=0o755)
    try:
        with open(os.path.join(top, "o.txt"), "w") as f:
            f.write("in run\n")
        os.symlink(f"../../{name}/o.txt", os.path.join(top, "sub", "up_run"))
        os.symlink("../../../etc/passwd", os.path.join(top, "sub", "up_root"))
        os.symlink("../etc/passwd", created[0])
        os.symlink(f"{name}/sub", created[1])
        yield top, created
    finally:
        for path in created:
            if os.path.lexists(path):
                os.unlink(path)
        shutil.rmtree(top)


def test_every_symlink_under_run_resolves_as_outside(user, rootless_run, scratch,
                                                      planted_in_run):
    """/run as dockerd-rootless.sh copies it up (with /etc). /run/user is left out: the
    runtime dirs of the other test slots come and go meanwhile."""
    base, _ = scratch
    top, created = planted_in_run
    paths = symlinks_under("/run", skip=("/run/user",))
    paths += [f"{created[1]}/up_run", f"{created[1]}/up_root"]
    before = snapshot(top)
    # Inside, an entry of /run is replaced as dockerd-rootless.sh does (rm -f /run/docker).
    then = f'rm -f "{top}" && mkdir "{top}" && touch "{top}/mine"'
    outside, inside = check(user, rootless_run, base, paths, ["/etc", "/run"], then=then)
    for path in (f"{top}/sub/up_run", f"{created[1]}/up_run"):
        assert outside[path][0] == f"{top}/o.txt"
    for path in (f"{top}/sub/up_root", created[0], f"{created[1]}/up_root"):
        assert outside[path][0] == "/etc/passwd"
    assert_same(outside, inside)
    assert snapshot(top) == before


def test_copy_up_of_a_dir_the_user_cannot_list_is_one_line(user, rootless_run, scratch):
    base, _ = scratch
    closed = os.path.join(base, "closed")
    os.mkdir(closed, 0o700)
    r = user.run([rootless_run, "--net=none", f"--copy-up={closed}", "--", "true"])
    assert r.returncode == 1
    assert r.stderr == f"rootless-run: error: --copy-up={closed}: cannot list it: " \
                       f"Permission denied\n"
