"""The layers import only what they should (docs/architecture.md)."""

from __future__ import annotations

import json
import subprocess
import sys


def modules_loaded_by(module: str) -> list[str]:
    """Every module a fresh interpreter has loaded after importing `module`."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return list(json.loads(done.stdout))


def test_the_game_master_client_needs_neither_the_lifecycles_nor_opentelemetry() -> None:
    loaded = modules_loaded_by("rtmanager.client")
    assert [m for m in loaded if m.startswith("rtmanager.lifecycle")] == []
    assert [m for m in loaded if m.startswith(("rtmanager.adapters", "rtmanager.workers"))] == []
    assert [m for m in loaded if m.startswith("opentelemetry")] == []


def test_the_domain_imports_nothing_else_of_the_project() -> None:
    loaded = modules_loaded_by("rtmanager.domain.jobs, rtmanager.domain.operation")
    ours = [m for m in loaded if m.startswith("rtmanager") and m != "rtmanager"]
    assert all(m.startswith("rtmanager.domain") for m in ours), ours


def modules_loaded_by_telemetry(*, metrics_addr: str, otlp_endpoint: str) -> list[str]:
    """The modules of a fresh interpreter that imported the server's code and built its telemetry.

    As `rtmanager serve` does: the composition root and the command line
    are imported, then the exporters the settings ask for are built, with
    the server's interceptors.
    """
    code = (
        "import json, sys, rtmanager.app, rtmanager.cli\n"
        "from rtmanager.telemetry import TelemetryExport\n"
        f"export = TelemetryExport(metrics_addr={metrics_addr!r}, "
        f"otlp_endpoint={otlp_endpoint!r}, service_name='rtmanager')\n"
        "export.server_interceptors()\n"
        "export.telemetry.operation_finished(kind='start', source='gm_rest', "
        "outcome='success', error_code='', seconds=0.1)\n"
        "export.shutdown()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return list(json.loads(done.stdout))


def test_a_server_without_an_otlp_endpoint_loads_neither_the_exporter_nor_the_grpc_tracing() -> (
    None
):
    loaded = modules_loaded_by_telemetry(metrics_addr="", otlp_endpoint="")
    assert [m for m in loaded if m.startswith("opentelemetry.exporter")] == []
    assert [m for m in loaded if m.startswith("opentelemetry.instrumentation")] == []
    assert [m for m in loaded if m.startswith("prometheus_client")] == []


def test_an_otlp_endpoint_loads_the_exporter_and_the_grpc_tracing() -> None:
    # The other side of the test above: the module names it looks for are the real ones.
    loaded = modules_loaded_by_telemetry(metrics_addr="", otlp_endpoint="http://127.0.0.1:4317")
    assert "opentelemetry.exporter.otlp.proto.grpc.trace_exporter" in loaded
    assert "opentelemetry.instrumentation.grpc" in loaded
    assert [m for m in loaded if m.startswith("opentelemetry.exporter.prometheus")] == []
