"""X.509 certificates for the cluster's mutual TLS (agent/security): real certificates, real TLS."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.security import (
    CA_DAYS,
    CLUSTER_SERVER_NAME,
    NODE_DAYS,
    CertificateError,
    NodeCredentials,
    certificate_node_id,
    create_ca,
    expires_soon,
    issue_node_certificate,
    load_node_credentials,
    node_file_stem,
    validate_node_id,
)
from agent.security.cli import certs_main

pytestmark = pytest.mark.timeout(30)

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return create_ca(now=NOW)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName), [
        str(a) for a in names.get_values_for_type(x509.IPAddress)
    ]


def _write_set(folder: Path, ca: tuple[bytes, bytes], cert: bytes, key: bytes) -> tuple[Path, Path, Path]:
    paths = (folder / "node-1.crt", folder / "node-1.key", folder / "ca.crt")
    for path, payload in zip(paths, (cert, key, ca[0]), strict=True):
        path.write_bytes(payload)
    return paths


def _hand_built(
    ca: tuple[bytes, bytes], *, san: bool = True, usages: list[x509.ObjectIdentifier] | None = None
) -> tuple[bytes, bytes]:
    """A node certificate built directly with cryptography, to leave out what issue_node_certificate adds."""
    ca_cert = _cert(ca[0])
    ca_key = serialization.load_pem_private_key(ca[1], password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30 * 12))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                usages or [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(CLUSTER_SERVER_NAME)]), False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# ------------------------------------------------------------------------------------ building certificates


def test_ca_certificate_profile(ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = ca
    cert = _cert(cert_pem)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert cert.subject == cert.issuer and certificate_node_id(cert_pem) == "dpgan cluster CA"
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=CA_DAYS)
    cert.verify_directly_issued_by(cert)


def test_node_certificate_profile(ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = issue_node_certificate(
        *ca, "node-1", dns_names=["Peer.Example.org", "dpgan-peer"], ip_addresses=["10.0.0.7", "::1"], now=NOW
    )
    cert, ca_cert = _cert(cert_pem), _cert(ca[0])
    cert.verify_directly_issued_by(ca_cert)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert certificate_node_id(cert_pem) == "node-1"
    assert cert.subject.rfc4514_string() == "CN=node-1"
    assert _sans(cert) == (["dpgan-peer", "node-1", "peer.example.org"], ["10.0.0.7", "::1"])
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_agreement
    assert not usage.value.key_cert_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    authority = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    subject_of_ca = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert authority.key_identifier == subject_of_ca.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=NODE_DAYS)


def test_a_node_id_that_is_no_dns_name_is_only_the_common_name(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = issue_node_certificate(*ca, "Node_1:7", now=NOW)
    assert certificate_node_id(cert_pem) == "Node_1:7"
    assert _sans(_cert(cert_pem)) == ([CLUSTER_SERVER_NAME], [])


def test_node_validity_is_cut_to_the_ca_expiry() -> None:
    short_ca = create_ca(days=10, now=NOW)
    cert_pem, _ = issue_node_certificate(*short_ca, "node-1", days=365, now=NOW)
    assert _cert(cert_pem).not_valid_after_utc == _cert(short_ca[0]).not_valid_after_utc


@pytest.mark.parametrize(
    ("node_id", "problem"),
    [
        ("", "empty"),
        ("a" * 65, "65 characters"),
        ("node 1", "' '"),
        ("node\t1", "'\\t'"),
        ("node,1", "','"),
        ("nöde", "'ö'"),
    ],
)
def test_invalid_node_ids_are_refused(ca: tuple[bytes, bytes], node_id: str, problem: str) -> None:
    with pytest.raises(CertificateError, match="node id") as caught:
        issue_node_certificate(*ca, node_id, now=NOW)
    assert problem in str(caught.value)


def test_the_longest_node_id_is_accepted(ca: tuple[bytes, bytes]) -> None:
    node_id = "n" * 64
    assert validate_node_id(node_id) == node_id
    assert certificate_node_id(issue_node_certificate(*ca, node_id, now=NOW)[0]) == node_id


def test_issuing_refuses_a_bad_ca_or_bad_names(ca: tuple[bytes, bytes]) -> None:
    other = create_ca(now=NOW)
    with pytest.raises(CertificateError, match="does not match"):
        issue_node_certificate(ca[0], other[1], "node-1", now=NOW)
    node_cert, node_key = issue_node_certificate(*ca, "node-1", now=NOW)
    with pytest.raises(CertificateError, match="not a CA"):
        issue_node_certificate(node_cert, node_key, "node-2", now=NOW)
    with pytest.raises(CertificateError, match="expired"):
        issue_node_certificate(*ca, "node-1", now=NOW + timedelta(days=CA_DAYS + 1))
    with pytest.raises(CertificateError, match="not a DNS name"):
        issue_node_certificate(*ca, "node-1", dns_names=["bad_name"], now=NOW)
    with pytest.raises(CertificateError, match="not an IP address"):
        issue_node_certificate(*ca, "node-1", ip_addresses=["10.0.0.300"], now=NOW)


# ------------------------------------------------------------------------------------ loading credentials


def test_load_node_credentials_accepts_a_good_set(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = issue_node_certificate(*ca, "node-1", now=NOW)
    cert_path, key_path, ca_path = _write_set(tmp_path, ca, cert_pem, key_pem)
    creds = load_node_credentials(cert_path, key_path, ca_path, now=NOW + timedelta(days=1))
    assert creds == NodeCredentials(
        certificate_pem=cert_pem,
        private_key_pem=key_pem,
        ca_pem=ca[0],
        node_id="node-1",
        not_valid_after=NOW + timedelta(days=NODE_DAYS),
        cert_path=cert_path,
        key_path=key_path,
        ca_path=ca_path,
    )
    assert not expires_soon(creds, NOW)
    assert expires_soon(creds, NOW + timedelta(days=NODE_DAYS - 29))
    assert not expires_soon(creds, NOW + timedelta(days=NODE_DAYS - 29), days=7)
    # A CA bundle (rotation: old and new CA) is accepted when one of them signed the certificate.
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(create_ca(now=NOW)[0] + ca[0])
    assert load_node_credentials(cert_path, key_path, bundle, now=NOW).node_id == "node-1"


def _refusal(cert_path: Path, key_path: Path, ca_path: Path, **kwargs: object) -> str:
    with pytest.raises(CertificateError) as caught:
        load_node_credentials(cert_path, key_path, ca_path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_certificate_of_another_ca_is_refused(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    other = create_ca("another CA", now=NOW)
    cert_path, key_path, ca_path = _write_set(
        tmp_path, ca, *issue_node_certificate(*other, "node-1", now=NOW)
    )
    message = _refusal(cert_path, key_path, ca_path, now=NOW)
    assert "node-1.crt" in message and "not signed by the CA" in message and "another CA" in message
    # Same CA name, different key (a CA re-created with --force): the signature check catches it.
    twin = create_ca(now=NOW)
    _write_set(tmp_path, ca, *issue_node_certificate(*twin, "node-1", now=NOW))
    assert "re-created" in _refusal(cert_path, key_path, ca_path, now=NOW)


def test_expired_and_not_yet_valid_certificates_are_refused(tmp_path: Path) -> None:
    older_ca = create_ca(now=NOW - timedelta(days=1))
    paths = _write_set(tmp_path, older_ca, *issue_node_certificate(*older_ca, "node-1", days=30, now=NOW))
    message = _refusal(*paths, now=NOW + timedelta(days=31))
    assert "node-1.crt" in message and "expired on 2030-07-01 12:00:00 UTC" in message
    message = _refusal(*paths, now=NOW - timedelta(hours=1))
    assert "node-1.crt" in message and "not valid yet" in message and "2030-06-01 11:55:00 UTC" in message


def test_an_expired_ca_is_refused(tmp_path: Path) -> None:
    short_ca = create_ca(days=10, now=NOW)
    paths = _write_set(tmp_path, short_ca, *issue_node_certificate(*short_ca, "node-1", now=NOW))
    message = _refusal(*paths, now=NOW + timedelta(days=11))
    assert "ca.crt" in message and "expired" in message


def test_a_key_of_another_certificate_is_refused(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = issue_node_certificate(*ca, "node-1", now=NOW)
    _, other_key = issue_node_certificate(*ca, "node-1", now=NOW)
    message = _refusal(*_write_set(tmp_path, ca, cert_pem, other_key), now=NOW)
    assert "node-1.key" in message and "does not belong" in message and "node-1.crt" in message


def test_a_certificate_without_the_cluster_name_is_refused(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    paths = _write_set(tmp_path, ca, *_hand_built(ca, san=False))
    message = _refusal(*paths, now=NOW)
    assert "node-1.crt" in message and repr(CLUSTER_SERVER_NAME) in message
    assert "dial" in message and "dpgan-agent certs issue" in message
    load_node_credentials(
        *_write_set(tmp_path, ca, *_hand_built(ca)), now=NOW
    )  # the same with the SAN passes


def test_a_certificate_without_client_auth_is_refused(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    paths = _write_set(tmp_path, ca, *_hand_built(ca, usages=[ExtendedKeyUsageOID.SERVER_AUTH]))
    message = _refusal(*paths, now=NOW)
    assert "node-1.crt" in message and "extendedKeyUsage lacks clientAuth;" in message


def test_ca_roles_are_checked(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = issue_node_certificate(*ca, "node-1", now=NOW)
    cert_path, key_path, ca_path = _write_set(tmp_path, ca, cert_pem, key_pem)
    # The node certificate given as the CA.
    message = _refusal(cert_path, key_path, cert_path, now=NOW)
    assert "node-1.crt" in message and "not a CA certificate" in message
    # The CA given as the node certificate (with its own key).
    ca_key_path = tmp_path / "ca.key"
    ca_key_path.write_bytes(ca[1])
    message = _refusal(ca_path, ca_key_path, ca_path, now=NOW)
    assert "ca.crt" in message and "is a CA certificate, not a node certificate" in message


def test_unreadable_and_garbage_files_are_refused(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    cert_path, key_path, ca_path = _write_set(tmp_path, ca, *issue_node_certificate(*ca, "node-1", now=NOW))
    missing = tmp_path / "missing.crt"
    assert "missing.crt: no such file" in _refusal(missing, key_path, ca_path, now=NOW)
    assert "missing.crt: no such file" in _refusal(cert_path, key_path, missing, now=NOW)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a certificate\n")
    assert "garbage.pem: is not PEM" in _refusal(garbage, key_path, ca_path, now=NOW)
    assert "garbage.pem: is not PEM" in _refusal(cert_path, garbage, ca_path, now=NOW)
    broken = tmp_path / "broken.crt"
    broken.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert "broken.crt: is not a valid PEM certificate" in _refusal(broken, key_path, ca_path, now=NOW)
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    assert "empty.key: is empty" in _refusal(cert_path, empty, ca_path, now=NOW)
    # Swapped certificate and key.
    assert "node-1.key: holds a PRIVATE KEY, not a certificate" in _refusal(
        key_path, cert_path, ca_path, now=NOW
    )
    assert "is a folder" in _refusal(tmp_path, key_path, ca_path, now=NOW)
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "encrypted.key: the private key is encrypted" in _refusal(cert_path, encrypted, ca_path, now=NOW)


def test_messages_name_the_flag_a_file_came_from(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    cert_path, key_path, ca_path = _write_set(tmp_path, ca, *issue_node_certificate(*ca, "node-1", now=NOW))
    flags = {"cert": "--tls-cert", "key": "--tls-key", "ca": "--tls-ca"}
    message = _refusal(cert_path, key_path, ca_path, now=NOW + timedelta(days=NODE_DAYS + 1), flags=flags)
    assert message.startswith(f"--tls-cert {cert_path}: expired on ")


# ------------------------------------------------------------------------------------------------- CLI


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = certs_main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cli_init_writes_the_ca_and_refuses_to_replace_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pki" / "ca"
    status, out, _ = _run(capsys, "init", "--dir", str(folder), "--days", "30", "--common-name", "test CA")
    assert status == 0 and str(folder / "ca.crt") in out and str(folder / "ca.key") in out
    assert _mode(folder) == 0o700 and _mode(folder / "ca.key") == 0o600 and _mode(folder / "ca.crt") == 0o644
    cert = _cert((folder / "ca.crt").read_bytes())
    assert certificate_node_id((folder / "ca.crt").read_bytes()) == "test CA"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30, minutes=5)
    original = (folder / "ca.crt").read_bytes()

    status, _, err = _run(capsys, "init", "--dir", str(folder))
    assert status == 2 and err.count("\n") == 1 and err.startswith("dpgan-agent certs: error: ")
    assert "ca.crt" in err and "ca.key" in err and "--exist-ok" in err and "--force" in err
    assert (folder / "ca.crt").read_bytes() == original

    status, out, _ = _run(capsys, "init", "--dir", str(folder), "--exist-ok")
    assert status == 0 and "kept" in out and (folder / "ca.crt").read_bytes() == original

    status, _, err = _run(capsys, "init", "--dir", str(folder), "--force")
    assert status == 0 and "warning" in err and "stops working" in err
    assert (folder / "ca.crt").read_bytes() != original


def test_cli_init_exist_ok_refuses_a_broken_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "init", "--dir", str(tmp_path))[0] == 0
    (tmp_path / "ca.key").unlink()
    status, _, err = _run(capsys, "init", "--dir", str(tmp_path), "--exist-ok")
    assert status == 2 and "ca.key is missing" in err and "--force" in err


def test_cli_issue_and_its_overwrite_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, out_dir = tmp_path / "ca", tmp_path / "nodes"
    assert _run(capsys, "init", "--dir", str(ca_dir))[0] == 0
    issue = ("issue", "--node-id", "node-1", "--ca-dir", str(ca_dir), "--out", str(out_dir))
    status, out, _ = _run(
        capsys, *issue, "--dns", "a.example", "b.example", "--ip", "10.0.0.1", "--days", "90"
    )
    cert_path, key_path = out_dir / "node-1.crt", out_dir / "node-1.key"
    assert status == 0 and str(cert_path) in out and str(key_path) in out and "valid until" in out
    assert _mode(cert_path) == 0o644 and _mode(key_path) == 0o600
    creds = load_node_credentials(cert_path, key_path, ca_dir / "ca.crt")
    assert creds.node_id == "node-1"
    assert _sans(_cert(creds.certificate_pem)) == (
        ["dpgan-peer", "node-1", "a.example", "b.example"],
        ["10.0.0.1"],
    )
    original = cert_path.read_bytes()

    status, _, err = _run(capsys, *issue)
    assert status == 2 and "node-1.crt" in err and "--exist-ok" in err and "--force" in err
    assert cert_path.read_bytes() == original

    status, out, _ = _run(capsys, *issue, "--exist-ok", "--ip", "10.0.0.1")
    assert status == 0 and "kept" in out and cert_path.read_bytes() == original

    # A requested address the certificate lacks makes --exist-ok re-issue.
    status, out, _ = _run(capsys, *issue, "--exist-ok", "--ip", "10.0.0.2")
    assert status == 0 and "re-issuing" in out and "10.0.0.2" in out
    assert _sans(_cert(cert_path.read_bytes()))[1] == ["10.0.0.2"]

    status, _, _ = _run(capsys, *issue, "--force")
    assert status == 0 and cert_path.read_bytes() != original


def test_cli_issue_exist_ok_reissues_expired_or_foreign_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, "init", "--dir", str(tmp_path))[0] == 0
    ca = ((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes())
    cert_path, key_path = tmp_path / "node-1.crt", tmp_path / "node-1.key"
    # An expired certificate of this CA (issued two days ago for one day).
    past = datetime.now(UTC) - timedelta(days=2)
    expired = issue_node_certificate(*ca, "node-1", days=1, now=past)
    cert_path.write_bytes(expired[0])
    key_path.write_bytes(expired[1])
    status, out, _ = _run(capsys, "issue", "--node-id", "node-1", "--ca-dir", str(tmp_path), "--exist-ok")
    assert status == 0 and "re-issuing" in out and "expired" in out
    creds = load_node_credentials(cert_path, key_path, tmp_path / "ca.crt")
    assert creds.not_valid_after > datetime.now(UTC) + timedelta(days=300)
    # A certificate of another CA.
    foreign = issue_node_certificate(*create_ca(), "node-1")
    cert_path.write_bytes(foreign[0])
    key_path.write_bytes(foreign[1])
    status, out, _ = _run(capsys, "issue", "--node-id", "node-1", "--ca-dir", str(tmp_path), "--exist-ok")
    assert status == 0 and "not signed by the CA" in out
    load_node_credentials(cert_path, key_path, tmp_path / "ca.crt")
    # A certificate for another node id under this node's file names.
    other = issue_node_certificate(*ca, "node-2")
    cert_path.write_bytes(other[0])
    status, out, _ = _run(capsys, "issue", "--node-id", "node-1", "--ca-dir", str(tmp_path), "--exist-ok")
    assert status == 0 and "re-issuing" in out
    assert load_node_credentials(cert_path, key_path, tmp_path / "ca.crt").node_id == "node-1"


def test_cli_issue_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "init", "--dir", str(tmp_path))[0] == 0
    for argv, problem in [
        (["--node-id", "node 1"], "node id 'node 1' contains ' '"),
        (["--node-id", "a" * 65], "at most 64"),
        (["--node-id", "n", "--ip", "300.1.1.1"], "not an IP address"),
        (["--node-id", "n", "--days", "0"], "at least 1 day"),
        (["--node-id", "n", "--force", "--exist-ok"], "not allowed with"),
        (["--node-id", "ca"], "would write over the CA files"),
    ]:
        status, out, err = _run(capsys, "issue", "--ca-dir", str(tmp_path), *argv)
        assert status == 2 and out == "", argv
        assert err.count("\n") == 1 and err.startswith("dpgan-agent certs: error: ") and problem in err, err
    status, _, err = _run(capsys, "issue", "--node-id", "n", "--ca-dir", str(tmp_path / "none"))
    assert status == 2 and "ca.crt: no such file" in err and "certs init" in err
    status, _, err = _run(capsys, "frobnicate")
    assert status == 2 and err.count("\n") == 1 and "invalid choice" in err
    assert _run(capsys, "--help")[0] == 0


def test_cli_issue_file_names_replace_unsafe_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert node_file_stem("rack/7:gpu@0") == "rack_7_gpu_0"
    assert _run(capsys, "init", "--dir", str(tmp_path))[0] == 0
    assert _run(capsys, "issue", "--node-id", "rack/7:gpu@0", "--ca-dir", str(tmp_path))[0] == 0
    creds = load_node_credentials(
        tmp_path / "rack_7_gpu_0.crt", tmp_path / "rack_7_gpu_0.key", tmp_path / "ca.crt"
    )
    assert creds.node_id == "rack/7:gpu@0"


def test_cli_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "init", "--dir", str(tmp_path))[0] == 0
    assert _run(capsys, "issue", "--node-id", "node-1", "--ca-dir", str(tmp_path), "--ip", "10.1.2.3")[0] == 0
    status, out, _ = _run(capsys, "show", str(tmp_path / "ca.crt"), str(tmp_path / "node-1.crt"))
    assert status == 0
    ca_part, node_part = out.split("\n\n")
    assert "subject CN:  dpgan cluster CA" in ca_part and "CA:          yes" in ca_part
    assert "SANs:        DNS:dpgan-peer, DNS:node-1, IP:10.1.2.3" in node_part
    assert "issuer:      CN=dpgan cluster CA" in node_part and "CA:          no" in node_part
    assert "valid, 364 days left" in node_part
    fingerprint = _cert((tmp_path / "node-1.crt").read_bytes()).fingerprint(hashes.SHA256()).hex(":").upper()
    assert f"SHA-256:     {fingerprint}" in node_part
    status, _, err = _run(capsys, "show", str(tmp_path / "node-1.key"), str(tmp_path / "missing.crt"))
    assert (
        status == 2 and "node-1.key: holds no PEM certificate" in err and "missing.crt: cannot be read" in err
    )


# -------------------------------------------------------------------------------------- real mutual TLS


@dataclass
class _TlsServer:
    port: int
    cluster_ca: tuple[bytes, bytes]  # (certificate PEM, key PEM)
    callers: list[str]  # the certificate CN of every call /test.Whoami/Get served


@pytest.fixture()
def tls_server() -> Iterator[_TlsServer]:
    """A gRPC server demanding client certificates of its cluster CA (issued for the real current time):
    Health, plus /test.Whoami/Get, which answers the auth context keys and the caller's certificate CN."""
    callers: list[str] = []

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        auth = context.auth_context()
        callers.append(auth["x509_common_name"][0].decode())
        return b",".join(sorted(key.encode() for key in auth)) + b"|" + auth["x509_common_name"][0]

    cluster_ca = create_ca()
    server_cert, server_key = issue_node_certificate(*cluster_ca, "server-node")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Whoami", {"Get": grpc.unary_unary_rpc_method_handler(whoami)}
            )
        ]
    )
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(server_key, server_cert)], root_certificates=cluster_ca[0], require_client_auth=True
        ),
    )
    server.start()
    try:
        yield _TlsServer(port, cluster_ca, callers)
    finally:
        server.stop(None)


_OPTIONS = [("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME), ("grpc.enable_http_proxy", 0)]


def _calls(
    port: int, credentials: grpc.ChannelCredentials, options: list[tuple[str, object]] | None = None
) -> tuple[int, bytes]:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options or _OPTIONS) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        return status, channel.unary_unary("/test.Whoami/Get")(b"", timeout=5)


def test_mutual_tls_with_grpc(tls_server: _TlsServer) -> None:
    port, callers, cluster_ca = tls_server.port, tls_server.callers, tls_server.cluster_ca
    client_cert, client_key = issue_node_certificate(*cluster_ca, "Client_7:a")  # no DNS name: CN only
    status, answer = _calls(port, grpc.ssl_channel_credentials(cluster_ca[0], client_key, client_cert))
    assert status == health_pb2.HealthCheckResponse.SERVING
    keys, common_name = answer.split(b"|")
    assert common_name == b"Client_7:a" and callers == ["Client_7:a"]
    assert {b"x509_common_name", b"x509_subject", b"transport_security_type"} <= set(keys.split(b","))

    other_ca = create_ca("another CA")
    stranger_cert, stranger_key = issue_node_certificate(*other_ca, "stranger")
    expired_cert, expired_key = issue_node_certificate(
        *cluster_ca, "expired", days=1, now=datetime.now(UTC) - timedelta(days=2)
    )
    refused = {
        "another CA": grpc.ssl_channel_credentials(cluster_ca[0], stranger_key, stranger_cert),
        "no client certificate": grpc.ssl_channel_credentials(cluster_ca[0]),
        "expired": grpc.ssl_channel_credentials(cluster_ca[0], expired_key, expired_cert),
        "server of another CA": grpc.ssl_channel_credentials(other_ca[0], stranger_key, stranger_cert),
    }
    for name, credentials in refused.items():
        with pytest.raises(grpc.RpcError) as caught:
            _calls(port, credentials)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, name
    # Without the name override the client checks the server against "127.0.0.1", which no node
    # certificate lists: the reason every client sets grpc.ssl_target_name_override.
    with pytest.raises(grpc.RpcError) as caught:
        _calls(port, grpc.ssl_channel_credentials(cluster_ca[0], client_key, client_cert), [_OPTIONS[1]])
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert callers == ["Client_7:a"], "no refused client reached a handler"
