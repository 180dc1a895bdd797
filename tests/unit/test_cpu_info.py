"""The CPU line printed beside every benchmark table."""

import sys

import pytest

from src.models import cpu_info

pytestmark = pytest.mark.unit


def test_the_description_names_the_cpu_and_only_the_relevant_flags_it_has(monkeypatch):
    fake = "processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse avx2 amx_tile avx512f\n"
    monkeypatch.setattr(cpu_info.Path, "read_text", lambda self, **kwargs: fake)
    assert cpu_info.cpu_flags() == ["fpu", "sse", "avx2", "amx_tile", "avx512f"]
    assert cpu_info.cpu_description() == "Some CPU 9000 (avx2 avx512f amx_tile)"


def test_without_proc_cpuinfo_the_name_comes_from_platform(monkeypatch):
    def unreadable(self, **kwargs):
        raise OSError("no such file")

    monkeypatch.setattr(cpu_info.Path, "read_text", unreadable)
    assert cpu_info.cpu_flags() is None
    assert cpu_info.cpu_description()  # platform's name for it, never an error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo")
def test_this_machine_is_described():
    assert cpu_info.cpu_flags()
    assert "(" in cpu_info.cpu_description()
