"""The batched low-rank math against its per-row reference, on every path it can take."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch

from server.adapters import lowrank, lowrank_choice
from server.adapters.lowrank import (
    KernelBuildError,
    LowRankError,
    LowRankTable,
    NativeKernel,
    RowGroups,
    build_kernel,
    low_rank_apply,
    low_rank_apply_reference,
)
from server.adapters.method import Hook
from server.adapters.slots import SlotTable
from server.config import EngineSettings
from server.engine.engine import Engine
from server.torch_threads import on_own_thread, single_threaded

ACTS = [None, "relu", "gelu", "silu", "tanh"]
BIG = 24  # a small big-group threshold keeps the reference loop short
HAS_CC = shutil.which("cc") is not None


def make_table(
    in_f: int,
    out_f: int,
    ranks: list[int],
    dtype: torch.dtype,
    biases: bool = False,
    seed: int = 0,
) -> LowRankTable:
    """One slot per rank; rank 0 leaves the slot empty."""
    gen = torch.Generator().manual_seed(seed)
    table = LowRankTable(len(ranks), in_f, out_f, dtype, max_rank=max(ranks))
    for slot, r in enumerate(ranks):
        if r == 0:
            continue
        a = torch.randn(r, in_f, generator=gen) * in_f**-0.5
        b = torch.randn(r, out_f, generator=gen) * r**-0.5
        a_bias = torch.randn(r, generator=gen) if biases and slot % 2 == 0 else None
        b_bias = torch.randn(out_f, generator=gen) if biases and slot % 3 != 2 else None
        table.set(slot, *(t if t is None else t.to(dtype) for t in (a, b, a_bias, b_bias)))
    return table


def check(
    table: LowRankTable,
    row_slots: list[int],
    act: str | None = None,
    in_place: bool = False,
    use_native: bool = True,
    big_group_rows: int = lowrank.NEVER_BIG,
    seed: int = 1,
) -> torch.Tensor:
    """Run fast and reference on the same inputs, assert they agree and that y moved."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.tensor(row_slots, dtype=torch.int64)
    n = len(row_slots)
    x = torch.randn(n, table.in_features, generator=gen).to(table.dtype)
    y = x.clone() if in_place else torch.randn(n, table.out_features, generator=gen).to(table.dtype)
    before = y.clone()
    expected = y.clone()
    low_rank_apply_reference(x.clone() if in_place else x, expected, table, slots, act)
    groups = RowGroups.build(slots, big_group_rows)
    low_rank_apply(y if in_place else x, y, table, groups, act, use_native=use_native)
    kernel_only = use_native and not groups.big_spans and lowrank.native_kernel() is not None
    if table.dtype == torch.float32 or (kernel_only and table.dtype == torch.bfloat16):
        torch.testing.assert_close(y, expected)
    else:
        # The torch path rounds the rank-r intermediate to the table's dtype between matmuls.
        torch.testing.assert_close(y, expected, rtol=1.6e-2, atol=2e-2)
    with_adapter = torch.tensor([s >= 0 and table.get(s) is not None for s in row_slots], dtype=torch.bool)
    assert torch.equal(y[~with_adapter], before[~with_adapter]), "a row without adapter changed"
    if with_adapter.any():
        assert not torch.equal(y[with_adapter], before[with_adapter]), "no row with an adapter changed"
    return y


@pytest.fixture(autouse=True)
def _two_threads():
    """The kernel splits work between threads; run with two as in production."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_native_kernel_builds_here():
    assert lowrank.native_kernel() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_native", [True, False])
def test_ranks_differ_per_slot_and_rows_without_adapter(dtype, use_native):
    table = make_table(200, 333, [1, 3, 16, 0, 7, 33, 2], dtype)
    rows = [0, -1, 1, 2, 2, 3, 4, -1, 5, 5, 5, 6, 0, 1, 4, 4, 4, 4, 4, 2, -1]
    check(table, rows, use_native=use_native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("use_native", [True, False])
def test_biases_and_activations(dtype, act, use_native):
    table = make_table(96, 160, [4, 8, 5, 16], dtype, biases=True)
    check(table, [3, 0, 1, 2, 2, -1, 0, 3, 3, 1], act=act, use_native=use_native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("use_native", [True, False])
def test_in_place_bottleneck(dtype, act, use_native):
    table = make_table(128, 128, [8, 64, 3], dtype, biases=True)
    check(table, [0, 1, 2, -1, 1, 1, 0, 2, 2, 2, 2, 2, 1], act=act, in_place=True, use_native=use_native)


@pytest.mark.parametrize("in_place", [False, True])
def test_gather_path_on_prefill_sized_groups(in_place):
    """Segments as long as the prompts, one padded, beside a one-row group and rows without adapter."""
    table = make_table(64, 64, [8, 4, 16], torch.float32, biases=True)
    check(table, [0] * 37 + [-1] * 3 + [1] * 20 + [2], act="gelu", in_place=in_place, use_native=False)


def test_gather_path_segments_are_one_row_at_decode_and_long_at_prefill():
    decode = RowGroups.build([3, 0, -1, 1, 2])
    seg = decode.segments(64)
    assert seg.length == 1, "one row per group: BGMV, no padding"
    assert seg.stack_index.tolist() == [1, 2, 3, 4] and seg.targets.tolist() == [1, 3, 4, 0]
    assert seg.rows.tolist() == seg.targets.tolist() and seg.positions.tolist() == [0, 1, 2, 3]

    row_slots = [0] * 100 + [-1] * 5 + [1] * 30 + [2]
    seg = RowGroups.build(row_slots).segments(64)
    count = seg.stack_index.shape[0]
    assert seg.length > 1 and count <= 5, "weights gathered per segment, not per token"
    rows = seg.rows.view(count, seg.length)
    for k in range(count):  # every position of a segment, padding too, reads a row of its slot
        assert {row_slots[r] for r in rows[k].tolist()} == {seg.stack_index[k].item() - 1}
    assert seg.rows[seg.positions].tolist() == seg.targets.tolist()
    assert sorted(seg.targets.tolist()) == [n for n, s in enumerate(row_slots) if s >= 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_with_big_and_small_groups(dtype):
    table = make_table(64, 64, [8, 4], dtype, biases=True)
    check(table, [0] * BIG + [1, -1, 1], act="silu", in_place=True, big_group_rows=BIG)


def test_empty_batch_and_no_adapters():
    table = make_table(32, 48, [4], torch.bfloat16)
    groups = RowGroups.build(torch.empty(0, dtype=torch.int64))
    assert groups.spans == () and groups.kernel_groups is None and groups.max_slot == -1
    low_rank_apply(
        torch.empty(0, 32, dtype=torch.bfloat16), torch.empty(0, 48, dtype=torch.bfloat16), table, groups
    )
    check(table, [-1, -1, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_rows_one_slot_takes_the_big_group_path(dtype):
    rows = [1] * (BIG + 5)
    groups = RowGroups.build(torch.tensor(rows), BIG)
    assert groups.kernel_groups is None
    assert groups.big_spans == ((1, 0, len(rows)),)
    check(make_table(64, 96, [4, 16], dtype, biases=True), rows, act="gelu", big_group_rows=BIG)
    assert RowGroups.build(torch.tensor([0] * 5), big_group_rows=5).kernel_groups is None
    assert RowGroups.build(torch.tensor([0] * 5)).kernel_groups is not None  # unset: never big


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_big_and_small_groups(dtype):
    rows = [2] * BIG + [0, 1, -1, 3] + [3] * (BIG + 1) + [1]
    gen = torch.Generator().manual_seed(5)
    rows = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
    groups = RowGroups.build(torch.tensor(rows), BIG)
    assert [s for s, _, _ in groups.big_spans] == [2, 3]
    assert groups.kernel_groups is not None and groups.kernel_groups[0].item() == 2
    check(make_table(80, 120, [5, 16, 8, 2], dtype, biases=True), rows, act="tanh", big_group_rows=BIG)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_like_batch_matches_reference(dtype):
    """Many groups of uneven size and shapes off the vector width, so threads split groups."""
    gen = torch.Generator().manual_seed(3)
    ranks = [16, 8, 1, 0, 4, 12, 16, 3, 16, 32] * 4
    p = 1.0 / torch.arange(1, len(ranks) + 1, dtype=torch.float64)
    rows = torch.multinomial(p, 64, replacement=True, generator=gen).tolist()
    rows[::9] = [-1] * len(rows[::9])
    table = make_table(576 + 13, 192 + 7, ranks, dtype)
    y1 = check(table, rows)
    torch.set_num_threads(1)
    y2 = check(table, rows)
    # Each output is summed by one thread in a fixed order, so the split changes nothing.
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows(dtype):
    """x and y may be row slices of wider tensors, as views of a fused projection are."""
    table = make_table(40, 24, [4, 6], dtype, biases=True)
    slots = torch.tensor([0, 1, -1, 1, 0])
    wide_x = torch.randn(5, 100).to(dtype)
    wide_y = torch.randn(5, 70).to(dtype)
    x, y = wide_x[:, 10:50], wide_y[:, 30:54]
    expected = y.clone()
    low_rank_apply_reference(x, expected, table, slots, "relu")
    low_rank_apply(x, y, table, RowGroups.build(slots), "relu")
    torch.testing.assert_close(wide_y[:, 30:54], expected)


def test_float16_uses_the_torch_path():
    check(make_table(48, 40, [4, 2], torch.float16, biases=True), [0, 1, -1, 0], act="gelu")


def test_cleared_and_wiped_slot_is_no_adapter():
    table = make_table(32, 32, [4, 4], torch.float32)
    table.clear(1)
    table.wipe(1)
    assert table.rank(1) == 0 and table.get(1) is None
    check(table, [0, 1, 1, 0])


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
@pytest.mark.parametrize(
    "flags",
    [("-march=x86-64",), ("-march=haswell",), ("-march=native", "-mno-avx512bf16")],
    ids=["portable", "avx2", "avx512-without-bf16"],
)
def test_other_kernel_builds_match_reference(flags, monkeypatch, tmp_path):
    """The scalar fallback, the AVX2 path and the AVX-512 path without bf16 dot products."""
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    base = tuple(f for f in lowrank.CFLAGS if not f.startswith("-march"))
    try:
        kernel = NativeKernel(build_kernel((*base, *flags)))
    except KernelBuildError as e:
        pytest.skip(f"compiler cannot build {flags}: {e}")
    monkeypatch.setattr(lowrank, "_kernel", kernel)
    monkeypatch.setattr(lowrank, "_kernel_tried", True)
    for dtype in (torch.float32, torch.bfloat16):
        table = make_table(100, 70, [3, 16, 5], dtype, biases=True)
        check(table, [0, 1, 2, 1, -1, 2, 2, 2, 2, 2, 0], act="gelu")
        check(make_table(70, 70, [4, 9], dtype), [1, 0, 1, 1], act="relu", in_place=True)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_build_is_cached_per_source_flags_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    path = build_kernel()
    assert path.is_relative_to(tmp_path / "kernels") and path.exists()
    mtime = path.stat().st_mtime_ns
    assert build_kernel() == path and path.stat().st_mtime_ns == mtime
    assert list(path.parent.iterdir()) == [path], "the temporary file was left behind"
    assert build_kernel((*lowrank.CFLAGS, "-DLR_SOME_FLAG")) != path


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise KernelBuildError("no C compiler found (install gcc, or set CC)")

    monkeypatch.setattr(lowrank, "build_kernel", no_compiler)
    monkeypatch.setattr(lowrank, "_kernel", None)
    monkeypatch.setattr(lowrank, "_kernel_tried", False)
    monkeypatch.setattr(lowrank, "_warned", set())
    table = make_table(32, 16, [4, 2], torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger=lowrank.__name__):
        check(table, [0, 1, -1])
        check(table, [1, 1, 0])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C compiler" in warnings[0].getMessage()


def test_table_rejects_bad_tensors():
    table = LowRankTable(2, 8, 6, torch.float32, max_rank=4)
    with pytest.raises(LowRankError, match="a must be"):
        table.set(0, torch.zeros(4, 7), torch.zeros(4, 6))
    with pytest.raises(LowRankError, match="transposed"):
        table.set(0, torch.zeros(4, 8), torch.zeros(6, 4))
    with pytest.raises(LowRankError, match="float tensors"):
        table.set(0, torch.zeros(4, 8, dtype=torch.int32), torch.zeros(4, 6))
    with pytest.raises(LowRankError, match="a_bias"):
        table.set(0, torch.zeros(4, 8), torch.zeros(4, 6), a_bias=torch.zeros(3))
    with pytest.raises(LowRankError, match="outside"):
        table.set(2, torch.zeros(4, 8), torch.zeros(4, 6))


def test_apply_rejects_bad_calls():
    table = make_table(8, 6, [2, 2], torch.float32)
    groups = RowGroups.build(torch.tensor([0, 1, 1]))
    x, y = torch.zeros(3, 8), torch.zeros(3, 6)
    with pytest.raises(LowRankError, match="x must be"):
        low_rank_apply(torch.zeros(3, 7), y, table, groups)
    with pytest.raises(LowRankError, match="float32 like the table"):
        low_rank_apply(x.bfloat16(), y, table, groups)
    with pytest.raises(LowRankError, match="act must be"):
        low_rank_apply(x, y, table, groups, act="softplus")
    with pytest.raises(LowRankError, match="outside the table"):
        low_rank_apply(x, y, table, RowGroups.build(torch.tensor([0, 2, 1])))
    with pytest.raises(LowRankError, match="1-D integer"):
        RowGroups.build(torch.zeros(3))


def test_row_groups_layout():
    groups = RowGroups.build(torch.tensor([3, -1, 0, 3, 0, 5, -1, 3]), big_group_rows=3)
    assert groups.order.tolist() == [2, 4, 0, 3, 7, 5]
    assert groups.starts.tolist() == [0, 2, 5, 6]
    assert groups.slots.tolist() == [0, 3, 5]
    assert groups.order.dtype == groups.starts.dtype == groups.slots.dtype == torch.int32
    assert groups.big_spans == ((3, 2, 5),)
    assert groups.kernel_groups.tolist() == [2, 3, 0, 2, 3, 0, 5, 2, 4, 5]
    assert groups.index.tolist() == [2, 4, 0, 3, 7, 5] and groups.max_slot == 5


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_the_engine_builds_the_kernel_at_start_up_and_logs_it(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(lowrank, "_kernel", None)
    monkeypatch.setattr(lowrank, "_kernel_tried", False)
    with caplog.at_level(logging.INFO, logger=lowrank.__name__):
        Engine(tiny_model, EngineSettings())
    assert lowrank._kernel_tried and lowrank._kernel is not None  # the first LoRA step finds it ready
    assert any("low-rank kernel ready" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("use_native", [True, False])
def test_a_slot_reused_with_a_smaller_rank_or_cleared_keeps_no_old_weights(use_native):
    """The stacks are read in full by the gather path: padding and cleared rows must be zeros."""
    table = make_table(40, 24, [8, 8], torch.float32, biases=True)
    gen = torch.Generator().manual_seed(5)
    table.set(0, torch.randn(2, 40, generator=gen), torch.randn(2, 24, generator=gen))  # smaller, no bias
    assert table.rank(0) == 2 and table.get(0).a_bias is None
    assert not table.a[1, 2:].any() and not table.b[1, 2:].any() and not table.b_bias[1].any()
    check(table, [0, 1, -1, 0], use_native=use_native)
    table.clear(1)  # at once, no copy: the old rows stay until the slot's next occupant
    assert table.rank(1) == 0 and table.get(1) is None and table.a[2].any()
    table.wipe(1)  # what the next install does where its adapter has nothing
    assert not table.a[2].any() and not table.b[2].any() and not table.b_bias[2].any()
    check(table, [1, 0, 1], use_native=use_native)


def test_weights_of_another_dtype_are_converted_on_the_way_in():
    table = LowRankTable(1, 8, 6, torch.float32, max_rank=4)
    a, b = torch.randn(4, 8).to(torch.bfloat16), torch.randn(4, 6).to(torch.bfloat16)
    table.set(0, a, b, b_scale=0.5)
    assert torch.equal(table.a[1], a.float()) and torch.equal(table.b[1], b.float() * 0.5)


def test_rank_above_the_tables_max_rank_is_refused():
    table = LowRankTable(1, 8, 6, torch.float32, max_rank=4)
    with pytest.raises(LowRankError, match="max_rank 4"):
        table.set(0, torch.zeros(5, 8), torch.zeros(5, 6))


def test_switched_off_kernel_takes_the_gather_path(monkeypatch):
    calls = []
    monkeypatch.setattr(lowrank, "gather_apply", lambda *args, **kw: calls.append(args))
    table = make_table(16, 8, [2], torch.float32)
    groups = RowGroups.build([0, -1])
    lowrank.set_native(False)
    try:
        low_rank_apply(torch.zeros(2, 16), torch.zeros(2, 8), table, groups)
    finally:
        lowrank.set_native(True)
    segments = calls[0][3]
    assert len(calls) == 1 and segments.stack_index.tolist() == [1], "slot + 1"
    assert segments.targets.tolist() == [0], "the row without an adapter is left out"


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_calibration_is_measured_once_then_read_from_the_kernels_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(lowrank, "_kernel", NativeKernel(build_kernel()))
    monkeypatch.setattr(lowrank, "_kernel_tried", True)
    monkeypatch.setattr(lowrank_choice, "_loaded", {})
    shapes = [(torch.float32, 48, 40), (torch.bfloat16, 40, 24)]
    found = lowrank_choice.calibrate(shapes)
    path = lowrank_choice.calibration_file(lowrank.native_kernel().path)
    assert path.parent == lowrank.native_kernel().path.parent and path.is_relative_to(tmp_path)
    entries = json.loads(path.read_text())
    assert sorted(entries) == ["bfloat16 40x24", "float32 48x40"]
    for shape, entry in zip(shapes, (entries["float32 48x40"], entries["bfloat16 40x24"]), strict=True):
        assert found[shape] == entry["big_group_rows"]
        assert found[shape] == lowrank.NEVER_BIG or found[shape] in lowrank_choice.BUCKETS
        assert len(entry["kernel_us"]) == len(entry["torch_us"]) == len(entry["buckets"]) >= 1

    def no_measuring(*args):
        raise AssertionError("measured a shape the cache holds")

    monkeypatch.setattr(lowrank_choice, "measure", no_measuring)
    monkeypatch.setattr(lowrank_choice, "_loaded", {})  # a new process: only the file is left
    assert lowrank_choice.calibrate(shapes) == found
    assert lowrank_choice.calibrate([(torch.float16, 48, 40)]) == {(torch.float16, 48, 40): lowrank.NEVER_BIG}


def test_calibrations_under_other_openmp_wait_settings_are_kept_apart(monkeypatch):
    """Sleeping workers make every small torch op pay a wake-up: a calibration made so must not be
    read by a process whose workers spin (the suite once wrote such files where `make serve` read)."""
    kernel_path = Path("/cache/kernels/abc/lowrank_kernel.so")
    files = set()
    for policy, spin in (("PASSIVE", "30000"), ("PASSIVE", None), ("ACTIVE", "30000"), (None, None)):
        for name, value in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spin)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        path = lowrank_choice.calibration_file(kernel_path)
        assert path.parent == kernel_path.parent and path == lowrank_choice.calibration_file(kernel_path)
        files.add(path)
    assert len(files) == 4


def test_calibration_takes_the_first_bucket_from_which_torch_stays_faster(monkeypatch):
    """Torch wins at 8 (noise), loses at 16, wins from 32 on: the threshold is 32; measuring stops at 64."""
    timed = []
    torch_wins = {8, 32, 64, 128}

    def fake_torch_groups(x, y, table, groups, spans, act):
        timed.append(len(groups.order) // lowrank_choice.GROUPS)
        if timed[-1] not in torch_wins:
            time.sleep(2e-3)

    class SlowKernel:
        def apply(self, x, y, table, packed, act):
            if len(x) // lowrank_choice.GROUPS in torch_wins:
                time.sleep(2e-3)

    monkeypatch.setattr(lowrank_choice, "torch_groups", fake_torch_groups)
    monkeypatch.setattr(lowrank_choice, "SLOW_S", 1.0)
    entry = lowrank_choice.measure(SlowKernel(), (torch.float32, 16, 8))
    assert entry["big_group_rows"] == 32
    assert entry["buckets"] == [1, 2, 4, 8, 16, 32, 64] and max(timed) == 64


def test_a_slot_table_gives_its_tables_the_measured_threshold_or_the_chosen_path(tiny_model, monkeypatch):
    dims = tiny_model.shape.linear_dims()["q_proj"]
    monkeypatch.setattr(lowrank_choice, "calibrate", lambda shapes: dict.fromkeys(shapes, 7))
    rank = 2
    a, b = (
        torch.ones(rank, dims[0], dtype=tiny_model.dtype),
        torch.ones(rank, dims[1], dtype=tiny_model.dtype),
    )
    for path, native, rows in (
        ("auto", True, 7),
        ("kernel", True, lowrank.NEVER_BIG),
        ("torch", False, None),
    ):
        slots = SlotTable(
            2, tiny_model.shape, tiny_model.dtype, tiny_model.device, max_rank=4, lowrank_path=path
        )
        slots.set_lowrank(0, Hook.LINEAR_DELTA, (0, "q_proj"), dims, a, b)
        table = slots.lowrank[(Hook.LINEAR_DELTA, (0, "q_proj"))]
        assert table.native is (native and lowrank.kernel_takes(tiny_model.dtype))
        if native and table.native:
            assert table.big_group_rows == rows


def test_calibration_stops_after_a_slow_bucket(monkeypatch):
    """The kernel wins throughout, both paths slow from 16 rows per group on: measuring stops there."""
    monkeypatch.setattr(lowrank_choice, "SLOW_S", 0.05)

    def torch_path(x, *args):
        time.sleep(0.07 if len(x) // lowrank_choice.GROUPS >= 16 else 0.002)

    class Kernel:
        def apply(self, x, *args):
            if len(x) // lowrank_choice.GROUPS >= 16:
                time.sleep(0.06)

    monkeypatch.setattr(lowrank_choice, "torch_groups", torch_path)
    entry = lowrank_choice.measure(Kernel(), (torch.float32, 16, 8))
    assert entry["buckets"][-1] == 16 and entry["big_group_rows"] == lowrank.NEVER_BIG


def test_a_table_switched_to_torch_takes_the_gather_path_without_a_warning(monkeypatch, caplog):
    """--lowrank-path torch on the CPU: as asked, so nothing to warn about (it is not a fallback)."""
    monkeypatch.setattr(lowrank, "_warned", set())
    table = make_table(16, 24, [2, 3], torch.float32)
    table.native = False
    calls = []
    monkeypatch.setattr(lowrank, "gather_apply", lambda *args: calls.append(args))
    x, y = torch.randn(2, 16), torch.zeros(2, 24)
    with caplog.at_level(logging.WARNING, logger=lowrank.__name__):
        low_rank_apply(x, y, table, RowGroups.build([0, 1]))
    assert len(calls) == 1 and not caplog.records


def test_a_shape_first_seen_by_the_single_threaded_loader_is_measured_with_the_engines_threads(monkeypatch):
    seen = []

    def calibrate(shapes):
        seen.append(torch.get_num_threads())
        return dict.fromkeys(shapes, 7)

    monkeypatch.setattr(lowrank_choice, "calibrate", calibrate)

    def on_the_loader():
        single_threaded()
        return lowrank_choice.big_group_rows((torch.float32, 8, 8))

    assert on_own_thread(on_the_loader) == 7
    assert seen == [torch.get_num_threads()] and seen[0] > 1
