"""Reading the cgroup CPU quota that caps torch's threads, from fake cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cpu_quota import physical_cores, quota_cpus, quota_threads


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cgroup(tmp_path: Path, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /proc/self/cgroup and a fake /sys/fs/cgroup holding `files`."""
    proc, root = tmp_path / "proc-cgroup", tmp_path / "sys-fs-cgroup"
    write(proc, lines)
    root.mkdir()
    for name, text in files.items():
        write(root / name, text)
    return proc, root


def test_cgroup_v2_quota_is_read_in_the_process_cgroup(tmp_path):
    proc, root = cgroup(
        tmp_path, "0::/pod/ctr\n", {"pod/ctr/cpu.max": "150000 100000\n", "pod/cpu.max": "max 100000"}
    )
    assert quota_cpus(proc, root) == 1.5


def test_the_tightest_quota_of_the_cgroup_and_its_ancestors_wins(tmp_path):
    files = {"pod/ctr/cpu.max": "200000 100000", "pod/cpu.max": "50000 100000", "cpu.max": "max 100000"}
    proc, root = cgroup(tmp_path, "0::/pod/ctr\n", files)
    assert quota_cpus(proc, root) == 0.5


@pytest.mark.parametrize("controllers", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota_on_a_hybrid_host(tmp_path, controllers):
    lines = f"4:memory:/x\n1:{controllers}:/job\n0::/job\n"
    files = {
        "cpu/job/cpu.cfs_quota_us": "100000\n",
        "cpu/job/cpu.cfs_period_us": "100000\n",
        "unified/job/cgroup.procs": "",
    }
    proc, root = cgroup(tmp_path, lines, files)
    assert quota_cpus(proc, root) == 1.0


def test_no_quota_anywhere_is_none(tmp_path):
    files = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000", "unified/cpu.max": "max 100000"}
    proc, root = cgroup(tmp_path, "1:cpu:/\n0::/\n", files)
    assert quota_cpus(proc, root) is None
    assert quota_cpus(tmp_path / "no-such-file", root) is None


def test_a_container_without_its_own_cgroup_namespace_reads_the_top_of_its_mount(tmp_path):
    """/proc names the host's path (/docker/<id>), which the container's mount does not have."""
    proc, root = cgroup(tmp_path, "0::/docker/abc123\n", {"cpu.max": "200000 100000"})
    assert quota_cpus(proc, root) == 2.0


@pytest.mark.parametrize(
    "files",
    [
        {"a/cpu.max": "garbage", "cpu/cpu.cfs_quota_us": "x", "cpu/cpu.cfs_period_us": "100000"},
        {"a/cpu.max": "abc 100000", "cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "0"},
        {"a/cpu.max": "100000 0"},
    ],
)
def test_unreadable_quota_files_and_lines_are_ignored(tmp_path, files):
    """This runs when the server package is imported: nothing it reads may raise."""
    proc, root = cgroup(tmp_path, "garbled line\n1:cpu:/\n0::/a\n", files)
    assert quota_cpus(proc, root) is None


def test_physical_cores_count_hyperthreads_of_one_core_once(tmp_path):
    for cpu, siblings in {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}.items():
        write(tmp_path / f"cpu{cpu}/topology/core_cpus_list", siblings + "\n")
    assert physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert physical_cores({0, 2}, tmp_path) == 1
    assert physical_cores({0, 7}, tmp_path) == 2, "unreadable topology: one core per CPU"


@pytest.mark.parametrize(
    ("quota", "cores", "threads"),
    [
        (None, 4, None),
        (1.5, 4, 1),
        (0.25, 4, 1),
        (3.0, 4, 3),
        (4.0, 4, None),
        (2.9, 2, None),
        (16.0, 4, None),
    ],
)
def test_the_quota_caps_threads_only_below_one_per_core(quota, cores, threads):
    assert quota_threads(quota, cores) == threads
