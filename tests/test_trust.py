"""The agent's start-up checks for TLS and run identity (agent/node/trust.py, agent/node/main.py):
plaintext is refused on a network address without --insecure, TLS files come as a set and are
checked naming the file, the node id is the certificate's, and the run id is validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.config import ConfigError, build_config
from agent.node.main import agent_main, agent_parser, build_options
from agent.node.trust import allowlist, is_loopback_host
from tests.pki import Pki

pytestmark = pytest.mark.timeout(60)

BASE = ["--iterations", "10", "--peers", "127.0.0.1:6001"]


def options(argv: list[str]):
    from agent.configfile import config_from_args

    args = agent_parser().parse_args(argv)
    return build_options(args, config_from_args(args))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def test_plaintext_on_a_network_address_needs_insecure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [*BASE, "--listen", "0.0.0.0:6000", "--advertise", "10.1.2.3:6000", "--out", str(tmp_path / "o")]
    assert agent_main(argv) == 2
    error = capsys.readouterr().err
    assert "refusing to serve plaintext gRPC on 0.0.0.0" in error and "--insecure" in error
    chosen = options([*argv, "--insecure"])
    assert not chosen.security.enabled
    assert any("--insecure" in warning for warning in chosen.warnings)
    loopback = options([*BASE, "--listen", "127.0.0.1:6000", "--out", str(tmp_path / "l")])
    assert not loopback.security.enabled and loopback.warnings == ()


def test_tls_files_come_together_and_name_the_file(tmp_path: Path, pki: Pki) -> None:
    cert, key = pki.issue("node-7")
    listen = ["--listen", "0.0.0.0:6000", "--advertise", "10.1.2.3:6000", "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="missing --tls-key, --tls-ca"):
        options([*BASE, *listen, "--tls-cert", str(cert)])
    broken = tmp_path / "broken.crt"
    broken.write_text("not a certificate")
    with pytest.raises(ValueError, match=f"--tls-cert {broken}"):
        options(
            [*BASE, *listen, "--tls-cert", str(broken), "--tls-key", str(key), "--tls-ca", str(pki.ca_path)]
        )
    other = Pki.create(tmp_path / "other")
    with pytest.raises(ValueError, match=str(cert)):
        options(
            [*BASE, *listen, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(other.ca_path)]
        )
    with pytest.raises(ValueError, match="--insecure contradicts"):
        options([*BASE, *listen, *pki.flags("node-7"), "--insecure"])


def test_the_node_id_is_the_certificates(tmp_path: Path, pki: Pki) -> None:
    listen = ["--listen", "0.0.0.0:6000", "--advertise", "10.1.2.3:6000", "--out", str(tmp_path / "o")]
    chosen = options([*BASE, *listen, *pki.flags("node-7")])
    assert chosen.node_id == "node-7" and chosen.security.enabled
    assert chosen.security.credentials is not None and chosen.security.credentials.node_id == "node-7"
    with pytest.raises(ValueError, match=r"--node-id 'node-8' differs from the node id in --tls-cert"):
        options([*BASE, *listen, *pki.flags("node-7"), "--node-id", "node-8"])
    allowed = options([*BASE, *listen, *pki.flags("node-7"), "--allow-node-ids", "node-1, node-2"])
    assert allowed.security.allowed_node_ids == frozenset({"node-1", "node-2"})
    with pytest.raises(ValueError, match="allow_node_ids needs TLS"):
        options([*BASE, "--listen", "127.0.0.1:6000", "--allow-node-ids", "node-1"])


def test_run_ids_default_to_the_configuration_and_are_validated() -> None:
    first, second = build_config({}), build_config({"lr": 0.5})
    assert first.effective_run_id().startswith("cfg-") and len(first.effective_run_id()) == 16
    assert first.effective_run_id() == build_config({"threads": 2}).effective_run_id()  # node keys: same run
    assert first.effective_run_id() != second.effective_run_id()
    assert build_config({"run_id": "team-a.2026"}).effective_run_id() == "team-a.2026"
    for bad in ("", "-x", "has space", "x" * 64):
        with pytest.raises(ConfigError, match="run_id"):
            build_config({"run_id": bad})


def test_helpers() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("::") and not is_loopback_host("host")
    assert allowlist(None) is None and allowlist("a,b") == frozenset({"a", "b"})
    with pytest.raises(ValueError, match="lists no node id"):
        allowlist(" , ")


def test_a_node_id_file_keeps_the_identity_across_restarts(tmp_path: Path) -> None:
    from agent.node.trust import persistent_node_id

    path = tmp_path / "data" / "node-id"
    first = persistent_node_id(path, None)  # the hostname, written down
    assert path.read_text().strip() == first
    assert persistent_node_id(path, None) == first
    assert persistent_node_id(path, first) == first
    with pytest.raises(ValueError, match="contradicts --node-id-file"):
        persistent_node_id(path, "someone-else")
    path.write_text("\n")
    with pytest.raises(ValueError, match="the file is empty"):
        persistent_node_id(path, None)
    named = tmp_path / "named"
    assert persistent_node_id(named, "replica-3") == "replica-3" and named.read_text() == "replica-3\n"


def test_tls_issue_from_gives_a_node_its_own_certificate_once(tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "out"
    argv = [*BASE, "--listen", "0.0.0.0:6000", "--advertise", "10.1.2.3:6000", "--out", str(out)]
    argv += [
        "--node-id-file",
        str(out / "node-id"),
        "--node-id",
        "replica-1",
        "--tls-issue-from",
        str(pki.root),
    ]
    chosen = options(argv)
    assert chosen.node_id == "replica-1" and chosen.security.enabled
    cert = out / "tls" / "node.crt"
    before = cert.read_bytes()
    again = options([a for a in argv if a not in ("--node-id", "replica-1")])  # the file names it now
    assert again.node_id == "replica-1" and cert.read_bytes() == before  # kept while valid
    with pytest.raises(ValueError, match="issues --tls-cert and --tls-key itself"):
        options([*argv, *pki.flags("replica-1")])


def test_a_node_id_file_with_a_certificate_records_its_common_name(tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "out"
    argv = [*BASE, "--listen", "0.0.0.0:6000", "--advertise", "10.1.2.3:6000", "--out", str(out)]
    chosen = options([*argv, "--node-id-file", str(out / "node-id"), *pki.flags("node-9")])
    assert chosen.node_id == "node-9" and (out / "node-id").read_text() == "node-9\n"
