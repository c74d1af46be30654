import importlib.metadata
import json

import torch

from cdlib import provenance


def test_record_is_json_and_complete():
    record = provenance.environment_record()

    assert json.loads(json.dumps(record)) == record
    for key in (
        "recorded_at",
        "python",
        "executable",
        "packages",
        "platform",
        "cpu",
        "logical_cpus",
        "usable_cpus",
        "memory_gib",
        "torch_threads",
        "torch_interop_threads",
        "torch_default_seed",
        "thread_variables",
    ):
        assert key in record, key


def test_record_reads_this_process():
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(123)
        record = provenance.environment_record()
    finally:
        torch.random.set_rng_state(state)

    assert record["packages"]["torch"] == importlib.metadata.version("torch")
    assert record["packages"]["cdlib"] == importlib.metadata.version("cdlib")
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["torch_default_seed"] == 123


def test_missing_package_is_none():
    versions = provenance.package_versions(("torch", "no-such-distribution-xyz"))

    assert versions["torch"] is not None
    assert versions["no-such-distribution-xyz"] is None


def test_cpu_model_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU @ 2.00GHz\n")

    assert provenance.cpu_model(cpuinfo) == "Example CPU @ 2.00GHz"


def test_cpu_model_without_cpuinfo(tmp_path):
    assert provenance.cpu_model(tmp_path / "missing")


def test_memory_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25165824 kB\nMemFree: 1 kB\n")

    assert provenance.memory_gib(meminfo) == 24.0
    assert provenance.memory_gib(tmp_path / "missing") is None


def test_display_publishes_mime_type(monkeypatch):
    published = []
    monkeypatch.setattr(
        "IPython.display.display",
        lambda data, raw: published.append((data, raw)),
    )

    provenance.display_record()

    assert len(published) == 1
    data, raw = published[0]
    assert raw is True
    assert set(data) == {provenance.MIME_TYPE}
    assert data[provenance.MIME_TYPE]["python"]
