"""The entry points' re-execution with glibc's huge-page tunable (qnext_jax/host_memory.py)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qnext_jax import host_memory

LINUX_GLIBC = {"platform": "linux", "glibc": (2, 36), "thp": "madvise"}


@pytest.fixture
def machine(monkeypatch):
    """Sets the platform, the glibc version and the kernel's THP mode reexec_needed sees."""
    def set_machine(platform, glibc, thp):
        monkeypatch.setattr(host_memory.sys, "platform", platform)
        monkeypatch.setattr(host_memory, "glibc_version", lambda: glibc)
        monkeypatch.setattr(host_memory, "kernel_huge_page_mode", lambda: thp)
    return set_machine


def test_reexec_only_where_glibc_can_ask_for_huge_pages(machine):
    machine(**LINUX_GLIBC)
    assert host_memory.reexec_needed({})
    assert host_memory.reexec_needed({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    for changed, value in [("platform", "darwin"), ("glibc", None), ("glibc", (2, 34)),
                           ("thp", "never"), ("thp", "always"), ("thp", None)]:
        machine(**{**LINUX_GLIBC, changed: value})
        assert not host_memory.reexec_needed({}), (changed, value)


def test_no_reexec_when_set_already_or_opted_out(machine):
    machine(**LINUX_GLIBC)
    assert not host_memory.reexec_needed({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not host_memory.reexec_needed({host_memory.OPT_OUT: "1"})


def test_the_version_and_mode_readers_parse_this_machine():
    version = host_memory.glibc_version()
    assert version is None or (len(version) == 2 and all(isinstance(v, int) for v in version))
    assert host_memory.kernel_huge_page_mode() in (None, "always", "madvise", "never")


SCRIPT = textwrap.dedent("""
    import json, os, sys
    from qnext_jax import host_memory
    host_memory.sys.platform = "linux"  # whatever the test machine is: exercise the re-exec
    host_memory.glibc_version = lambda: (2, 36)
    host_memory.kernel_huge_page_mode = lambda: "madvise"
    print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES")}))
    host_memory.use_huge_pages_for_host_buffers()
    print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                      "argv": sys.argv[1:]}))
""")


def test_reexec_keeps_pid_arguments_and_other_tunables(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
    env.pop(host_memory.OPT_OUT, None)
    completed = subprocess.run([sys.executable, str(script), "a=1", "--flag"], env=env,
                               capture_output=True, text=True, timeout=60, check=True)
    before, *after = [json.loads(line) for line in completed.stdout.splitlines()]
    # Once, not in a loop: the first run re-executes, the second finds the tunable and goes on.
    assert before == {"pid": before["pid"], "tunables": "glibc.malloc.arena_max=4"}
    assert len(after) == 2 and after[0]["pid"] == after[1]["pid"] == before["pid"]
    assert after[1] == {"pid": before["pid"], "argv": ["a=1", "--flag"],
                        "tunables": "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"}
