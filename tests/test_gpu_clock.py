"""The kernel benchmark's clock sampling (pure parsing; the timings themselves need the GPU machine)."""
from benchmarks.gpu_clock import ClockMonitor, parse_smi_sample


def test_parse_smi_sample():
    stamp, mhz, watts, reasons = parse_smi_sample("2026/11/29 23:31:02.500, 1755, 652.10, 0x0000000000000004")
    assert (mhz, watts, reasons) == (1755.0, 652.1, 4)
    assert parse_smi_sample("2026/11/29 23:31:03.500, 1980, 120.00, 0x0")[0] - stamp == 1.0
    for line in ("", "No devices were found", "2026/11/29 23:31:02.500, [N/A], 652.10, 0x0"):
        assert parse_smi_sample(line) is None


def test_clock_window_summarizes_samples_inside_it():
    monitor = ClockMonitor()
    monitor.samples = [(0.0, 1980.0, 120.0, 0), (1.0, 1755.0, 650.0, 4), (2.0, 1500.0, 700.0, 4),
                       (3.0, 1425.0, 699.0, 4), (9.0, 1980.0, 100.0, 0)]
    assert monitor.window(0.5, 3.5) == {"sm_mhz": 1500.0, "watts": 700.0, "power_capped": True}
    assert monitor.window(-1.0, 0.5) == {"sm_mhz": 1980.0, "watts": 120.0, "power_capped": False}
    assert monitor.window(4.0, 8.0) == {}
