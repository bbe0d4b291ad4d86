"""cli.py: the trace settings from argv and the environment (the trust switch and the trace table's byte budget)."""

from __future__ import annotations

import pytest

from laneproxy.cli import build_parser, settings_from_args


def settings(argv: list[str], environment: dict[str, str], monkeypatch):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return settings_from_args(build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize(
    ("argv", "environment", "trust", "table_bytes"),
    [
        pytest.param([], {}, False, 32 * 1024 * 1024, id="defaults_replace_client_ids_and_budget_32_mib"),
        pytest.param(["--trust-client-trace-id"], {}, True, 32 * 1024 * 1024, id="option_trusts"),
        pytest.param([], {"LANEPROXY_TRUST_CLIENT_TRACE_ID": "true"}, True, 32 * 1024 * 1024, id="environment_trusts"),
        pytest.param([], {"LANEPROXY_TRUST_CLIENT_TRACE_ID": "0"}, False, 32 * 1024 * 1024, id="environment_0_does_not"),
        pytest.param(["--no-trust-client-trace-id"], {"LANEPROXY_TRUST_CLIENT_TRACE_ID": "yes"}, False,
                     32 * 1024 * 1024, id="option_beats_environment"),
        pytest.param(["--trace-table-bytes", "4096"], {}, False, 4096, id="byte_budget_option"),
        pytest.param([], {"LANEPROXY_TRACE_TABLE_BYTES": "8192"}, False, 8192, id="byte_budget_environment"),
    ],
)
def test_trace_settings_come_from_options_then_environment_then_defaults(argv, environment, trust, table_bytes,
                                                                         monkeypatch):
    chosen = settings(argv, environment, monkeypatch)
    assert (chosen.trust_client_trace_id, chosen.trace_table_bytes) == (trust, table_bytes)


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_a_byte_budget_that_is_not_a_positive_number_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--trace-table-bytes", value])
    assert "--trace-table-bytes" in capsys.readouterr().err


def test_the_outlier_ejection_share_is_a_whole_percentage_as_in_envoy(capsys):
    # The compiled OutlierDetector checks its int at run time: a float here made the sidecar exit at start.
    parsed = settings_from_args(build_parser().parse_args(["run", "--outlier-max-ejection-percent", "100"]))
    assert type(parsed.outlier.max_ejection_percent) is int and parsed.outlier.max_ejection_percent == 100
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--outlier-max-ejection-percent", "12.5"])
    assert "whole percentage" in capsys.readouterr().err
